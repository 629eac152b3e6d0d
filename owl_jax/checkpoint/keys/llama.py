"""The released LLaMA's checkpoint keys: every `language_model` parameter ↔ its tensor in mPLUG-Owl's checkpoint.

The module names come from `owl_jax.modeling.llama.HF_MODULES`; this table only says what kind each
module is (LLaMA's linear layers and RMSNorms have no biases).

The released checkpoint also holds one `rotary_emb.inv_freq` buffer per layer. They carry no
information (they follow from `head_dim` and `rope_theta`): import skips them, export writes them again,
computed as the released code computes them, because that code loads with `strict=True`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from owl_jax.checkpoint.keys.targets import EMBEDDING, LINEAR_NO_BIAS, NORM, KeyRule, module_rules
from owl_jax.config import TextConfig
from owl_jax.modeling.llama import HF_LAYER, HF_MODULES

TOWER = "language_model"
KINDS = {
    "embed_tokens": EMBEDDING,
    "layers/input_layernorm": NORM,
    "layers/q_proj": LINEAR_NO_BIAS,
    "layers/k_proj": LINEAR_NO_BIAS,
    "layers/v_proj": LINEAR_NO_BIAS,
    "layers/o_proj": LINEAR_NO_BIAS,
    "layers/post_attention_layernorm": NORM,
    "layers/gate_proj": LINEAR_NO_BIAS,
    "layers/up_proj": LINEAR_NO_BIAS,
    "layers/down_proj": LINEAR_NO_BIAS,
    "norm": NORM,
    "lm_head": LINEAR_NO_BIAS,
}
ROTARY_INV_FREQ = HF_LAYER + "self_attn.rotary_emb.inv_freq"


def rules(*, tie_word_embeddings: bool = False, lora_modules: Sequence[str] = ()) -> list[KeyRule]:
    """The LLaMA key table; with `tie_word_embeddings` there is no `lm_head` (the embeddings are reused)."""
    modules = {m: n for m, n in HF_MODULES.items() if not (tie_word_embeddings and m == "lm_head")}
    return module_rules(TOWER, modules, {m: KINDS[m] for m in modules}, lora_modules=lora_modules)


def is_rotary_buffer(key: str) -> bool:
    """Whether `key` is a layer's `rotary_emb.inv_freq` buffer in the released layout."""
    prefix, suffix = ROTARY_INV_FREQ.split("{i}")
    return key.startswith(prefix) and key.endswith(suffix)


def rotary_buffers(text: TextConfig) -> Iterator[tuple[str, np.ndarray]]:
    """`(key, inv_freq (head_dim/2,) float32)` for every layer, computed as the released code computes them."""
    dim, base = text.head_dim, text.rope_theta
    try:
        import torch

        inv = (1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))).numpy()
    except ImportError:
        inv = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    for i in range(text.num_layers):
        yield ROTARY_INV_FREQ.format(i=i), inv.astype(np.float32)
