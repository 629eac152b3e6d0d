"""Answer normalisation of the official VQA evaluation (GT-Vision-Lab/VQA, `vqaEval.py`).

`normalize_answer` is what the official script does to a predicted answer: newlines and tabs become spaces,
then `process_punctuation`, then `process_digit_article`. Its quirks are kept on purpose, since the
evaluation server applies them to every submission:

- punctuation: each mark of `PUNCTUATION` is deleted when it touches a space somewhere in the answer, or
  when the answer holds a digit-comma-digit group ("1,000"); otherwise it becomes a space. The apostrophe,
  colon and period are not in the list;
- periods not followed by a digit are deleted ("yes." -> "yes", "3.5" kept), at most 32 of them (the
  official call passes `re.UNICODE`, whose value is 32, as the count);
- lower case, number words "none"/"zero" .. "ten" become digits, the articles "a", "an", "the" go, and
  words written without their apostrophe get it back from `CONTRACTIONS` ("dont" -> "don't").
"""

from __future__ import annotations

import re

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# The contracted forms the official table restores. A form with one apostrophe is looked up without it
# ("dont"); a form with several is looked up with exactly one of them missing ("couldnt've", "couldn'tve"),
# as in the official table, which has no entry with all of them missing. Forms with a capital ("I'm") can
# never match, since words are lower-cased first; they are kept so the table is the official one.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll
somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
"""


def _lookup_keys(form: str) -> list[str]:
    """The spellings of `form` the official table maps to it (see `_CONTRACTED`)."""
    cuts = [i for i, ch in enumerate(form) if ch == "'"]
    if len(cuts) == 1:
        return [form.replace("'", "")]
    return [form[:i] + form[i + 1 :] for i in cuts]


CONTRACTIONS = {key: form for form in _CONTRACTED.split() for key in _lookup_keys(form)}
# One official entry runs the other way (it removes the apostrophe); kept, as the server applies it.
CONTRACTIONS["somebody'd"] = "somebodyd"

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32


def process_punctuation(text: str) -> str:
    """The official punctuation step (see the module docstring); the tests are made on the input `text`."""
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Lower case, number words to digits, articles removed, contractions restored; words joined by one space."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the official VQA evaluation compares it."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))
