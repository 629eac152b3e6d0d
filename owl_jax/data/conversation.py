"""Training tokenization: a conversation → fixed-length ids with the answer-token loss mask.

Follows the released training code: the templated text (`prompts.templated_text`) is split at `<image>`,
`AI: ` and `\\nHuman: `, each piece is tokenized on its own (so each gets SentencePiece's dummy prefix),
the piece after every `AI: ` is an answer and is followed by an EOS, and only answers and their EOS are
trained on. Each image becomes a run of `image_tokens` ids of -1.

`tokenization="prompt"` trains what inference asks instead: the context before the last answer is
encoded as the processor encodes a prompt ending in `AI: ` (`owl_jax.data.prompt_ids`: only media markers
split the text), followed by that answer tokenized on its own and an EOS; only the last answer is trained on,
and earlier answers are context, as they are in a chat. Released checkpoints were trained the first way; a
small model trained from scratch learns the second far better, as it never sees at inference a sequence it
was not trained on.

Sequences longer than `seq_len` are cut at the end, never inside an image run (the cut moves to the run's
start and that image is dropped); shorter ones are padded with `pad_id`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from owl_jax.data.prompt_ids import encode_prompt, marker_pattern
from owl_jax.data.prompts import AI, HUMAN, IMAGE_MARKER

IMAGE_ID = -1
TOKENIZATIONS = ("released", "prompt")
_SPLIT = re.compile("(" + "|".join(map(re.escape, [IMAGE_MARKER, AI, "\n" + HUMAN])) + ")")
_MARKERS = {IMAGE_MARKER: IMAGE_ID}
_MARKER_SPLIT = marker_pattern(_MARKERS)


@dataclasses.dataclass
class TokenizedConversation:
    """Fixed-length arrays for one example.

    input_ids: `(L,)` int32, -1 on image runs, `pad_id` after the end.
    attention_mask: `(L,)` int32, 1 on real tokens.
    loss_mask: `(L - 1,)` int32, 1 where the target `input_ids[t + 1]` is an answer token or its EOS.
    num_images: images whose runs survived truncation (the first `num_images` of the example).
    truncated: whether the conversation was cut.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    num_images: int
    truncated: bool


def tokenize_conversation(
    text: str,
    encode: Callable[[str], list[int]],
    *,
    seq_len: int,
    image_tokens: int,
    bos_id: int = 1,
    eos_id: int = 2,
    pad_id: int = 0,
    tokenization: str = "released",
) -> TokenizedConversation:
    """Tokenize templated training text (see `templated_text`) into `seq_len` positions.

    Args:
      encode: text → ids without special tokens (e.g. `OwlProcessor.tokenizer.encode` with
        `add_special_tokens=False`).
      image_tokens: placeholder positions per image (`num_query_tokens + 1`).
      tokenization: "released" (every answer trained, pieces split at markers and turns) or "prompt" (the
        last answer trained, after its context encoded as inference encodes prompts); see the module doc.
    """
    if tokenization == "prompt":
        ids, labels = _last_answer(text, encode, image_tokens=image_tokens, bos_id=bos_id, eos_id=eos_id)
    elif tokenization == "released":
        ids, labels = _every_answer(text, encode, image_tokens=image_tokens, bos_id=bos_id, eos_id=eos_id)
    else:
        raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")
    return _fixed_length(ids, labels, seq_len=seq_len, pad_id=pad_id)


def _last_answer(
    text: str, encode: Callable[[str], list[int]], *, image_tokens: int, bos_id: int, eos_id: int
) -> tuple[list[int], list[int]]:
    cut = text.rfind(AI)
    if cut < 0:
        raise ValueError(f"the conversation has no {AI!r} turn: {text[:80]!r}...")
    context, answer = text[: cut + len(AI)], text[cut + len(AI) :]
    ids = encode_prompt(
        context, encode, bos_id=bos_id, marker_ids=_MARKERS, run_length=image_tokens, split=_MARKER_SPLIT
    )
    target = encode(answer) + [eos_id]
    return ids + target, [0] * len(ids) + [1] * len(target)


def _every_answer(
    text: str, encode: Callable[[str], list[int]], *, image_tokens: int, bos_id: int, eos_id: int
) -> tuple[list[int], list[int]]:
    ids: list[int] = [bos_id]
    labels: list[int] = [0]
    pieces = [p for p in _SPLIT.split(text) if p]
    for i, piece in enumerate(pieces):
        if piece == IMAGE_MARKER:
            ids += [IMAGE_ID] * image_tokens
            labels += [0] * image_tokens
        elif i > 0 and pieces[i - 1] == AI:
            answer = encode(piece) + [eos_id]
            ids += answer
            labels += [1] * len(answer)
        else:
            chunk = encode(piece)
            ids += chunk
            labels += [0] * len(chunk)
    return ids, labels


def _fixed_length(ids: list[int], labels: list[int], *, seq_len: int, pad_id: int) -> TokenizedConversation:
    truncated = len(ids) > seq_len
    if truncated:
        cut = seq_len
        if ids[cut - 1] == IMAGE_ID and ids[cut] == IMAGE_ID:  # the cut would split an image run
            while cut > 0 and ids[cut - 1] == IMAGE_ID:
                cut -= 1
        ids, labels = ids[:cut], labels[:cut]
    num_images = sum(1 for t in range(len(ids)) if ids[t] == IMAGE_ID and (t == 0 or ids[t - 1] != IMAGE_ID))
    length = len(ids)
    input_ids = np.full(seq_len, pad_id, np.int32)
    input_ids[:length] = ids
    attention = np.zeros(seq_len, np.int32)
    attention[:length] = 1
    label_array = np.zeros(seq_len, np.int32)
    label_array[:length] = labels
    return TokenizedConversation(input_ids, attention, label_array[1:].copy(), num_images, truncated)
