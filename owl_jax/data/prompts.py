"""The mPLUG-Owl conversation template, kept in one place.

The released model was instruction-tuned on one fixed layout: a system sentence, one `Human: <image>` line
per image (the video package: `Human: <|video|>` per video, mixed with images in any order), then
alternating `Human:` / `AI:` turns. Generation quality depends on matching it byte for byte
(the trailing space after the final `AI:` included), so every prompt in this project is built here.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<|video|>"  # the video package's marker; in the image package it is ordinary text
MEDIA_MARKERS = (IMAGE_MARKER, VIDEO_MARKER)
HUMAN = "Human: "
AI = "AI: "

# One exchange: (question, answer). The answer is None on the last turn when the model should write it.
Turn = tuple[str, str | None]


def build_prompt(
    turns: str | Sequence[Turn], num_images: int = 0, system: str = SYSTEM, media: Sequence[str] | None = None
) -> str:
    """Lay out a conversation in the released mPLUG-Owl template.

    Args:
      turns: the exchanges in order, each `(question, answer)`. Only the last answer may be None: the prompt
        then ends with `"AI: "` (trailing space, no newline) for the model to continue. A bare string is
        shorthand for `[(string, None)]`.
      num_images: how many images the conversation shows; each gets its own `Human: <image>` line right
        after the system sentence, in the order the images are passed to the processor.
      system: the opening sentence (the released one by default).
      media: instead of `num_images`, the markers of the media the conversation shows, in the order they
        are passed (`IMAGE_MARKER` or `VIDEO_MARKER`, mixed in any order): each gets its own `Human: <marker>`
        line, e.g. `media=[VIDEO_MARKER, IMAGE_MARKER]` for the video package's "a video, then a picture".

    Returns:
      The prompt string. For example `build_prompt("What is drawn?", num_images=1)` gives
      (`·` marks the trailing space; there is no final newline)::

        The following is a conversation between ... the user's questions.
        Human: <image>
        Human: What is drawn?
        AI:·

      i.e. `SYSTEM + "\\nHuman: <image>\\nHuman: What is drawn?\\nAI: "`. With `num_images=0` there is no
      `Human: <image>` line; a finished turn `(q, a)` contributes `"Human: {q}\\nAI: {a}\\n"`, and a turn
      with an empty question (a caption) only `"AI: {a}\\n"`.

    Raises:
      ValueError: no turns, a negative image count, a missing answer before the last turn, or an `<image>`
        marker inside the text (images are placed only through `num_images`, so user text cannot add
        image slots that have no pixels behind them).
    """
    if isinstance(turns, str):
        turns = [(turns, None)]
    turns = list(turns)
    if not turns:
        raise ValueError("build_prompt needs at least one (question, answer) turn")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if media is not None and num_images:
        raise ValueError("pass either num_images or media, not both")
    for i, turn in enumerate(turns):
        if len(turn) != 2:
            raise ValueError(f"turn {i} must be a (question, answer) pair, got {turn!r}")
    first = num_images if media is None else list(media)
    return build_conversation([(first if i == 0 else 0, q, a) for i, (q, a) in enumerate(turns)], system)


def build_conversation(turns: Sequence[tuple[int | Sequence[str], str, str | None]], system: str = SYSTEM) -> str:
    """A conversation whose turns may each bring media: `(num_images, question, answer)` per turn.

    Each turn's images get their `Human: <image>` lines just before its question (for the first turn that
    is right after the system sentence, as in `build_prompt`). Only the last answer may be None. Instead
    of a count, a turn may give its media markers in order (see `build_prompt`'s `media`).
    """
    parts = [system, "\n"]
    for i, (num_images, question, answer) in enumerate(turns):
        if isinstance(num_images, (list, tuple)):
            markers = list(num_images)
            for marker in markers:
                if marker not in MEDIA_MARKERS:
                    raise ValueError(f"turn {i}: media marker {marker!r} is not one of {MEDIA_MARKERS}")
        else:
            if num_images < 0:
                raise ValueError(f"turn {i}: num_images must be >= 0, got {num_images}")
            markers = [IMAGE_MARKER] * num_images
        parts += [f"{HUMAN}{marker}\n" for marker in markers]
        if answer is None and i != len(turns) - 1:
            raise ValueError(f"turn {i} has no answer, but only the last turn may be left open")
        for text in (question, answer or ""):
            if IMAGE_MARKER in text:
                raise ValueError(f"turn {i} contains {IMAGE_MARKER!r}; pass images through num_images instead")
        # An empty question (an image-caption pair) has no Human line: the answer follows the images.
        parts.append(f"{HUMAN}{question}\n{AI}" if question else AI)
        if answer is not None:
            parts.append(f"{answer}\n")
    return "".join(parts)


def count_images(prompt: str) -> int:
    """How many image slots `prompt` asks for (its `<image>` markers)."""
    return prompt.count(IMAGE_MARKER)


def count_videos(prompt: str) -> int:
    """How many video slots `prompt` asks for in the video package (its `<|video|>` markers)."""
    return prompt.count(VIDEO_MARKER)


def templated_text(turns: Sequence[tuple[str, str]], num_images: int = 0, system: str = SYSTEM) -> str:
    """The released training text: the template with every answer filled in and no final newline."""
    if any(answer is None for _, answer in turns):
        raise ValueError("templated_text needs every turn answered")
    return build_prompt(list(turns), num_images=num_images, system=system)[:-1]
