"""The tokenizer a run trains with, and its files that travel into every stage's `model/` folder.

LLaMA checkpoints ship a SentencePiece `tokenizer.model`; BLOOMZ ones a `tokenizer.json` with its
`tokenizer_config.json` and `special_tokens_map.json`, which name the special tokens
(`owl_jax.data.tokenizer`). `config.tokenizer` names one (the file or its folder); left empty, the run takes
the one in `model.checkpoint` (`model.llama` for towers). Only a LLaMA model falls back to the small demo
tokenizer (a random model, or a folder without a tokenizer: with a note); a BLOOM model never does.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any

import jax

from owl_jax.config import ConfigError, OwlConfig
from owl_jax.data.tokenizer import FAST_TOKENIZER_FILE, TOKENIZER_FILE, find_tokenizer_file, load_tokenizer

DEMO_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets", "demo_tokenizer.model")
# What names a `tokenizer.json`'s special tokens, read from beside it (`load_tokenizer`).
FAST_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class RunTokenizer:
    """The run's tokenizer: `path` (what the data pipeline reads), its special ids and vocabulary size."""

    path: str
    bos_id: int
    eos_id: int
    size: int

    def files(self) -> dict[str, str]:
        """`{name in a model folder: source file}`: `tokenizer.model`, or `tokenizer.json` with the files
        beside it that name its special tokens."""
        if os.path.basename(self.path) != FAST_TOKENIZER_FILE:
            return {TOKENIZER_FILE: self.path}
        folder = os.path.dirname(self.path)
        side = {n: os.path.join(folder, n) for n in FAST_TOKENIZER_SIDE_FILES}
        return {FAST_TOKENIZER_FILE: self.path, **{n: p for n, p in side.items() if os.path.isfile(p)}}

    def copy_into(self, folder: str) -> list[str]:
        """Copy `files()` into `folder` under their names there; returns the names."""
        for name, source in self.files().items():
            shutil.copyfile(source, os.path.join(folder, name))
        return sorted(self.files())


def run_tokenizer(config: Any, cfg: OwlConfig) -> RunTokenizer:
    """The tokenizer of a run of `config` training `cfg`'s model (see the module docstring).

    Raises `ConfigError` (one line naming the field or folder) when `config.tokenizer` holds no tokenizer,
    when a BLOOM model has none to take, when it cannot be read, or when it has more tokens than the model's
    `text.vocab_size`.
    """
    path, field = _find(config, cfg)
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: {' '.join(str(e).split())}") from None
    size = len(tokenizer)
    if size > cfg.text.vocab_size:
        raise ConfigError(
            f"{field}: the tokenizer at {path!r} has {size} tokens, more than the model's "
            f"text vocab_size {cfg.text.vocab_size}"
        )
    return RunTokenizer(path, int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), size)


def _find(config: Any, cfg: OwlConfig) -> tuple[str, str]:
    """The tokenizer file to read and the config field it comes from."""
    if config.tokenizer:
        found = find_tokenizer_file(config.tokenizer)
        if found is None:
            raise ConfigError(
                f"tokenizer={config.tokenizer!r} is not a {TOKENIZER_FILE} or {FAST_TOKENIZER_FILE}, nor a folder "
                "holding one"
            )
        return found, "tokenizer"
    m = config.model
    field = {"checkpoint": "model.checkpoint", "towers": "model.llama"}.get(m.init)
    folder = m[field.split(".")[1]] if field else ""
    found = find_tokenizer_file(folder) if folder and os.path.isdir(folder) else None
    if found is not None:
        return found, field
    kind = cfg.text.model_type
    if kind != "llama":
        missing = f"{field}={folder!r} holds no {FAST_TOKENIZER_FILE} or {TOKENIZER_FILE}"
        raise ConfigError(
            f"{missing if field else 'tokenizer is empty'}, and a {kind} model does not train with the demo LLaMA "
            "tokenizer; name its tokenizer folder with --config.tokenizer=DIR"
        )
    if field and jax.process_index() == 0:
        print(
            f"note: {field}={folder!r} holds no tokenizer; training with the demo tokenizer (--config.tokenizer=DIR)",
            file=sys.stderr,
        )
    return DEMO_TOKENIZER, "tokenizer"
