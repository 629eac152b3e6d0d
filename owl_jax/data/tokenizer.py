"""The two tokenizer files mPLUG-Owl checkpoints ship, loaded so that they give the released ids.

- `tokenizer.model` (LLaMA, SentencePiece): read with plain sentencepiece and the legacy encoding of
  transformers 4.28, which the release used (transformers 5's LLaMA tokenizer gives other ids).
- `tokenizer.json` (BLOOMZ: byte-level BPE, `BloomTokenizerFast` in the release): read by transformers'
  `PreTrainedTokenizerFast` from the local folder (never downloaded), with the special tokens of its
  `tokenizer_config.json` / `special_tokens_map.json`.

A folder holding both is read through `tokenizer.model`. Either way literal control-token text such as
"</s>" in a prompt stays ordinary text (`split_special_tokens`), and the tokenizer must define BOS and
EOS: the processor starts every prompt with BOS and pads with EOS, as the release does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

TOKENIZER_FILE = "tokenizer.model"  # SentencePiece (LLaMA)
FAST_TOKENIZER_FILE = "tokenizer.json"  # transformers/tokenizers (BLOOM)


class _LegacyLlamaTokenizer(SentencePieceBackend):
    """The LLaMA SentencePiece model with the legacy (transformers 4.28) encoding the release used.

    transformers 5's `LlamaTokenizer` (tokenizers backend) gives different ids; this plain sentencepiece path
    gives the released ones. Only decoding is changed: the base class joins pieces as text, which prints
    byte-fallback pieces (non-Latin text) as `<0xE6>`; sentencepiece itself turns them back into UTF-8.
    """

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        specials = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in specials:
                # Spacing as the 4.28 slow LLaMA tokenizer: a text run that ends at a special token gets one
                # space in front of it ("<s> Hi</s>"); this only shows with skip_special_tokens=False.
                if run:
                    out.append(" ")
                out += [self.sp_model.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run))
        return "".join(out)


def plain_decoder(tokenizer: Any) -> Callable[[list[int]], str] | None:
    """A faster `tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)` for
    the SentencePiece tokenizer, or None for a tokenizer it does not apply to.

    transformers decodes id by id in Python (each id to its piece, the pieces back to text); sentencepiece
    decodes the ids in one call, to the same text once the special ids are left out. A server decodes
    every generated token, so this is its hot path. None when the tokenizer has added tokens that are
    not special (their text is not in the SentencePiece model).
    """
    if not isinstance(tokenizer, _LegacyLlamaTokenizer):
        return None
    special = frozenset(tokenizer.all_special_ids)
    if any(i not in special for i in tokenizer.added_tokens_decoder):
        return None
    sp = tokenizer.sp_model

    def decode(ids: list[int]) -> str:
        return sp.decode([i for i in ids if i not in special])

    return decode


def find_tokenizer(folder: str | os.PathLike) -> str | None:
    """Path of the SentencePiece `tokenizer.model` in `folder` (or `folder` itself if it is that file), else None."""
    folder = os.fspath(folder)
    if os.path.isfile(folder) and folder.endswith(".model"):
        return folder
    path = os.path.join(folder, TOKENIZER_FILE)
    return path if os.path.isfile(path) else None


def find_tokenizer_file(folder: str | os.PathLike) -> str | None:
    """The tokenizer file a processor reads from `folder`: `tokenizer.model`, else `tokenizer.json`, else None.

    `folder` may also be such a file itself.
    """
    folder = os.fspath(folder)
    if os.path.isfile(folder) and (folder.endswith(".model") or folder.endswith(".json")):
        return folder
    for name in (TOKENIZER_FILE, FAST_TOKENIZER_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of `path` (a `tokenizer.model`, a `tokenizer.json`, or a folder holding one).

    Raises FileNotFoundError when there is no tokenizer file, and ValueError (naming the folder) when the
    tokenizer cannot be read or lacks a BOS or EOS token.
    """
    found = find_tokenizer_file(path)
    if found is None:
        raise FileNotFoundError(f"no {TOKENIZER_FILE} or {FAST_TOKENIZER_FILE} at {os.fspath(path)!r}")
    if found.endswith(".model"):
        return _LegacyLlamaTokenizer(
            vocab_file=found, bos_token="<s>", eos_token="</s>", unk_token="<unk>", split_special_tokens=True
        )
    folder = os.path.dirname(os.path.abspath(found))
    if os.path.basename(found) != FAST_TOKENIZER_FILE:
        raise ValueError(f"{found!r}: a tokenizers file must be named {FAST_TOKENIZER_FILE} inside its folder")
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True, split_special_tokens=True)
    except Exception as e:  # tokenizers and transformers raise many types for unreadable files
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot read the tokenizer in {folder!r} ({type(e).__name__}: {first_line})") from None
    for role in ("bos", "eos"):
        if getattr(tokenizer, f"{role}_token_id") is None:
            raise ValueError(
                f"the tokenizer in {folder!r} has no {role.upper()} token ({role}_token in tokenizer_config.json or "
                "special_tokens_map.json): mPLUG-Owl starts every prompt with BOS and pads with EOS"
            )
    return tokenizer
