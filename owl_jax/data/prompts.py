"""The mPLUG-Owl conversation template, kept in one place.

The released model was instruction-tuned on one fixed layout: a system sentence, one `Human: <image>` line
per image, then alternating `Human:` / `AI:` turns. Generation quality depends on matching it byte for byte
(the trailing space after the final `AI:` included), so every prompt in this project is built here.
"""

from __future__ import annotations

from collections.abc import Sequence

SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_MARKER = "<image>"
HUMAN = "Human: "
AI = "AI: "

# One exchange: (question, answer). The answer is None on the last turn when the model should write it.
Turn = tuple[str, str | None]


def build_prompt(turns: str | Sequence[Turn], num_images: int = 0, system: str = SYSTEM) -> str:
    """Lay out a conversation in the released mPLUG-Owl template.

    Args:
      turns: the exchanges in order, each `(question, answer)`. Only the last answer may be None: the prompt
        then ends with `"AI: "` (trailing space, no newline) for the model to continue. A bare string is
        shorthand for `[(string, None)]`.
      num_images: how many images the conversation shows; each gets its own `Human: <image>` line right
        after the system sentence, in the order the images are passed to the processor.
      system: the opening sentence (the released one by default).

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
    for i, turn in enumerate(turns):
        if len(turn) != 2:
            raise ValueError(f"turn {i} must be a (question, answer) pair, got {turn!r}")
    return build_conversation([(num_images if i == 0 else 0, q, a) for i, (q, a) in enumerate(turns)], system)


def build_conversation(turns: Sequence[tuple[int, str, str | None]], system: str = SYSTEM) -> str:
    """A conversation whose turns may each bring images: `(num_images, question, answer)` per turn.

    Each turn's images get their `Human: <image>` lines just before its question (for the first turn that
    is right after the system sentence, as in `build_prompt`). Only the last answer may be None.
    """
    parts = [system, "\n"]
    for i, (num_images, question, answer) in enumerate(turns):
        if num_images < 0:
            raise ValueError(f"turn {i}: num_images must be >= 0, got {num_images}")
        parts.append(f"{HUMAN}{IMAGE_MARKER}\n" * num_images)
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


def templated_text(turns: Sequence[tuple[str, str]], num_images: int = 0, system: str = SYSTEM) -> str:
    """The released training text: the template with every answer filled in and no final newline."""
    if any(answer is None for _, answer in turns):
        raise ValueError("templated_text needs every turn answered")
    return build_prompt(list(turns), num_images=num_images, system=system)[:-1]
