"""The released BLOOM's checkpoint keys: every `language_model` parameter ↔ its tensor in the BLOOMZ checkpoint.

The module names come from `owl_jax.modeling.bloom.HF_MODULES`; this table only says what kind each module
is (BLOOM's linear layers and LayerNorms all have biases). `query_key_value` stays fused: its rows
`[head, (q, k, v), head_dim]` are the Flax kernel's columns, and a LoRA B `(3H, r)` keeps that order.

The head is tied: the checkpoint saves `language_model.lm_head.weight` as a copy of
`language_model.transformer.word_embeddings.weight` (`TIED_COPIES`). Import reads the embeddings (or the
head, when it is the only one there); export writes both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from owl_jax.checkpoint.keys.targets import EMBEDDING, LINEAR_BIAS, LINEAR_NO_BIAS, NORM_BIAS, KeyRule, module_rules
from owl_jax.config import TextConfig
from owl_jax.modeling.bloom import HF_MODULES

TOWER = "language_model"
KINDS = {
    "word_embeddings": EMBEDDING,
    "word_embeddings_layernorm": NORM_BIAS,
    "layers/input_layernorm": NORM_BIAS,
    "layers/query_key_value": LINEAR_BIAS,
    "layers/dense": LINEAR_BIAS,
    "layers/post_attention_layernorm": NORM_BIAS,
    "layers/dense_h_to_4h": LINEAR_BIAS,
    "layers/dense_4h_to_h": LINEAR_BIAS,
    "ln_f": NORM_BIAS,
    "lm_head": LINEAR_NO_BIAS,
}
EMBEDDING_KEY = HF_MODULES["word_embeddings"] + ".weight"
HEAD_KEY = HF_MODULES["lm_head"] + ".weight"


def rules(*, tie_word_embeddings: bool = True, lora_modules: Sequence[str] = ()) -> list[KeyRule]:
    """The BLOOM key table; with `tie_word_embeddings` there is no `lm_head` (the embeddings are reused)."""
    modules = {m: n for m, n in HF_MODULES.items() if not (tie_word_embeddings and m == "lm_head")}
    return module_rules(TOWER, modules, {m: KINDS[m] for m in modules}, lora_modules=lora_modules)


def tied_copies(text: TextConfig) -> dict[str, str]:
    """`{key: the key saved as its copy}` for a tied head, else `{}`."""
    return {EMBEDDING_KEY: HEAD_KEY} if text.tie_word_embeddings else {}


def is_rotary_buffer(key: str) -> bool:
    """BLOOM has no rotary buffers (ALiBi is computed from the mask)."""
    return False


def rotary_buffers(text: TextConfig) -> Iterator[tuple[str, np.ndarray]]:
    """None: BLOOM's checkpoint holds no buffers."""
    return iter(())
