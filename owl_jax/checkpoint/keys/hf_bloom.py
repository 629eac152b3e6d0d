"""HF `BloomForCausalLM` checkpoints → our BLOOM: the key table `init` uses to start the language model.

The released checkpoint nests a `BloomForCausalLM` under `language_model.`, so this table is the released
BLOOM table (`keys.bloom`) without that prefix, and also without `transformer.`: BigScience's own files
(`bloom-7b1`, `bloomz-7b1`) were saved from the bare `BloomModel` (`h.0.input_layernorm.weight`, ...),
transformers' from `BloomForCausalLM` (`transformer.h.0...`); `strip_prefix` reads both alike. The tied
`lm_head.weight` is a copy of `word_embeddings.weight` when a file has it (`tied_copies`).
"""

from __future__ import annotations

import dataclasses
import re

from owl_jax.checkpoint.keys import bloom
from owl_jax.checkpoint.keys.targets import KeyRule, KeyTarget, expand
from owl_jax.checkpoint.leaves import Shapes
from owl_jax.config import TextConfig

NAME = "BLOOM"
PREFIX = "language_model."
TRANSFORMER = "transformer."
# Nothing in a BLOOM file is left unused (ALiBi and the causal mask are computed, not stored).
IGNORED = re.compile(r"(?!)")


def _local(key: str) -> str:
    """A released BLOOM key as an HF BLOOM file (read through `strip_prefix`) spells it."""
    if not key.startswith(PREFIX):
        raise KeyError(f"released BLOOM key {key!r} does not start with {PREFIX!r}")
    key = key[len(PREFIX) :]
    return key[len(TRANSFORMER) :] if key.startswith(TRANSFORMER) else key


def strip_prefix(key: str) -> str:
    """A file key as the table lists it (without `transformer.`)."""
    return key[len(TRANSFORMER) :] if key.startswith(TRANSFORMER) else key


def rules(*, tie_word_embeddings: bool = True) -> list[KeyRule]:
    """The table; `lm_head` is absent when the embeddings are tied."""
    return [
        dataclasses.replace(r, hf_key=_local(r.hf_key)) for r in bloom.rules(tie_word_embeddings=tie_word_embeddings)
    ]


def tied_copies(text: TextConfig) -> dict[str, str]:
    """`{"word_embeddings.weight": "lm_head.weight"}` for a tied head, else `{}`."""
    return {_local(k): _local(c) for k, c in bloom.tied_copies(text).items()}


def targets(text: TextConfig, shapes: Shapes) -> list[KeyTarget]:
    """Every tensor of a `BloomForCausalLM` checkpoint and the `Owl` leaf it fills (HF shapes: Linear `(out, in)`)."""
    return expand(rules(tie_word_embeddings=text.tie_word_embeddings), shapes, text.num_layers)
