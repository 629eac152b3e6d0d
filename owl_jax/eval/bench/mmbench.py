"""MMBench accuracy with circular evaluation (CircularEval, arXiv 2307.06281), as its evaluation server scores it.

A question with n options is asked n times, its options rotated each time; it counts as right only when
every rotation is answered right. Rotation r shows at letter j the original option (j + r) mod n, which is
how LLaVA's `model_vqa_mmbench.py --all-rounds` rotates (`options[1:] + options[:1]` after each round), so
the right letter at rotation r is the one at (answer - r) mod n.

Choice extraction (`extract_choice`), from a free-text answer and the options shown, first rule that applies:
1. a leading option letter followed by ".", ":", ")", "," or the end, or in parentheses: "B", "B.", "(B) cat";
2. exactly one option letter standing alone as a word (after `.()[],:;!*#{}"'` become spaces), where an
   "A" followed by a lower-case word is read as the article ("A cat sits"), not as a choice;
3. exactly one option whose text (lower case, stripped) occurs in the lower-cased answer, after dropping
   matches whose text lies inside another match's ("red and blue" beats "red");
otherwise no choice, and the answer counts as wrong. (The official server asks an LLM to match the answers
its own rules cannot place; here they count as wrong, and `unparsed` says how many there were.)

Inputs:
- `predictions`: `{question_id: [answer text of rotation 0, 1, ..., n-1]}` (texts or dicts with `"text"`);
- `ground_truth`: `{question_id: {"options": {"A": text, "B": text, ...}, "answer": letter, "category": str}}`
  with the options of rotation 0, their letters consecutive from "A".
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from owl_jax.eval.bench.inputs import answer_text, require_keys

_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])(?=[.:),]|\s*$))")
_SEPARATORS = re.compile(r"""[.()\[\],:;!*#{}"']""")


def _leading_letter(text: str, letters: Sequence[str]) -> str | None:
    m = _LEADING_LETTER.match(text)
    letter = m and (m.group(1) or m.group(2))
    return letter if letter in letters else None


def _standalone_letter(text: str, letters: Sequence[str]) -> str | None:
    words = _SEPARATORS.sub(" ", text).split()
    found = set()
    for i, w in enumerate(words):
        if w not in letters:
            continue
        if w == "A" and i + 1 < len(words) and words[i + 1][:1].islower():
            continue
        found.add(w)
    return found.pop() if len(found) == 1 else None


def _option_text(text: str, options: Mapping[str, str]) -> str | None:
    answer = text.lower()
    hits = {k: str(v).strip().lower() for k, v in options.items()}
    hits = {k: v for k, v in hits.items() if v and v in answer}
    hits = {k: v for k, v in hits.items() if not any(v != o and v in o for o in hits.values())}
    return next(iter(hits)) if len(hits) == 1 else None


def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer chose among `options` ({letter: text}), or None (module docstring)."""
    letters = list(options)
    return _leading_letter(text, letters) or _standalone_letter(text, letters) or _option_text(text, options)


def rotate_options(options: Mapping[str, str], r: int) -> dict[str, str]:
    """The options as rotation `r` shows them: letter j holds the original option (j + r) mod n."""
    letters, texts = list(options), list(options.values())
    n = len(letters)
    return {letters[j]: texts[(j + r) % n] for j in range(n)}


def evaluate_mmbench(predictions: Mapping[Any, Any], ground_truth: Mapping[Any, Mapping[str, Any]]) -> dict:
    """MMBench circular and single-pass accuracy, overall and per category.

    Returns `{"circular": %, "single_pass": %, "n": int, "unparsed": int, "per_category": {category:
    {"circular": %, "single_pass": %, "n": int}}, "per_question": {question_id: bool}}` with percentages in
    0..100. Single pass scores rotation 0 alone; `unparsed` counts answers (of all rotations) with no choice.
    Every question needs exactly one answer per option.
    """
    if not ground_truth:
        raise ValueError("ground_truth is empty")
    per_question: dict[Any, bool] = {}
    first_right: dict[Any, bool] = {}
    categories: dict[str, list[Any]] = {}
    unparsed = 0
    for qid, gt in ground_truth.items():
        where = f"question_id {qid!r}"
        require_keys(gt, ("options", "answer", "category"), f"{where} ground truth")
        options = dict(gt["options"])
        letters = list(options)
        if letters != list(string.ascii_uppercase[: len(letters)]) or len(letters) < 2:
            raise ValueError(f"{where}: options must be lettered A, B, ... (at least two), got {letters}")
        if gt["answer"] not in options:
            raise ValueError(f"{where}: answer {gt['answer']!r} is not one of the options {letters}")
        if qid not in predictions:
            raise KeyError(f"{where}: no prediction")
        rounds = predictions[qid]
        if isinstance(rounds, (str, Mapping)) or not isinstance(rounds, Sequence):
            raise TypeError(f"{where}: prediction must be a list of answers, one per rotation")
        if len(rounds) != len(letters):
            raise ValueError(f"{where}: {len(rounds)} answers, expected one per option ({len(letters)})")
        answer_idx = letters.index(gt["answer"])
        right = []
        for r, value in enumerate(rounds):
            choice = extract_choice(answer_text(value, f"{where} rotation {r}"), rotate_options(options, r))
            unparsed += choice is None
            right.append(choice == letters[(answer_idx - r) % len(letters)])
        per_question[qid] = all(right)
        first_right[qid] = right[0]
        categories.setdefault(gt["category"], []).append(qid)

    def pct(flags: Sequence[bool]) -> float:
        return 100.0 * sum(flags) / len(flags)

    return {
        "circular": pct(list(per_question.values())),
        "single_pass": pct(list(first_right.values())),
        "n": len(per_question),
        "unparsed": unparsed,
        "per_category": {
            c: {
                "circular": pct([per_question[q] for q in qids]),
                "single_pass": pct([first_right[q] for q in qids]),
                "n": len(qids),
            }
            for c, qids in categories.items()
        },
        "per_question": per_question,
    }
