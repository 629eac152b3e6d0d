"""Prompt text → ids, the one encoding that inference and the "prompt" training tokenization share.

BOS, then every stretch of text between media markers tokenized on its own without special tokens, and
every marker replaced by a run of placeholder ids. `OwlProcessor.encode_prompt` (what chat, the server
and the evaluators feed the model) calls it, and so does `tokenize_conversation(..., tokenization="prompt")`
for the context of the answer it trains on, so a model trained that way sees at inference exactly the ids
it was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping


def marker_pattern(markers: Mapping[str, int]) -> re.Pattern:
    """The regular expression that splits a prompt at (and keeps) each marker of `markers`."""
    return re.compile("(" + "|".join(map(re.escape, markers)) + ")")


def encode_prompt(
    prompt: str,
    encode: Callable[[str], list[int]],
    *,
    bos_id: int,
    marker_ids: Mapping[str, int],
    run_length: int,
    split: re.Pattern | None = None,
) -> list[int]:
    """Ids of one prompt (length L, no padding).

    Args:
      encode: text → ids without special tokens.
      marker_ids: `{marker: placeholder id}`, e.g. `{"<image>": -1}`.
      run_length: placeholder ids per marker (the model's `image_tokens`).
      split: `marker_pattern(marker_ids)`, when the caller keeps one compiled.

    Raises ValueError for two identical markers back to back: they would form one run that the model
    cannot split.
    """
    split = split or marker_pattern(marker_ids)
    ids = [bos_id]
    previous = None  # the marker just before, when only empty text separates it from this piece
    for piece in split.split(prompt):
        if piece in marker_ids:
            if piece == previous:
                raise ValueError(
                    f"adjacent {piece}{piece} markers in prompt {prompt[:80]!r}...: put text (e.g. a newline) "
                    "between them"
                )
            ids += [marker_ids[piece]] * run_length
            previous = piece
        elif piece:
            ids += encode(piece)
            previous = None
    return ids
