"""The released abstractor's checkpoint keys: every `abstractor` parameter ↔ its tensor in mPLUG-Owl's checkpoint.

The module names come from `owl_jax.modeling.abstractor.HF_MODULES` (the learned queries are the
top-level `query_tokens`); this table only says what kind each module is. The video layout adds the
top-level `temporal_query_tokens` and `abstractor.temporal_visual_fc` (`VIDEO_HF_MODULES`).
"""

from __future__ import annotations

from collections.abc import Sequence

from owl_jax.checkpoint.keys.targets import LINEAR_BIAS, NORM_BIAS, TENSOR, KeyRule, module_rules
from owl_jax.modeling.abstractor import HF_MODULES, VIDEO_HF_MODULES

TOWER = "abstractor"
KINDS = {
    "query_tokens": TENSOR,
    "layers/norm1": NORM_BIAS,
    "layers/normk": NORM_BIAS,
    "layers/query": LINEAR_BIAS,
    "layers/key": LINEAR_BIAS,
    "layers/value": LINEAR_BIAS,
    "layers/out_proj": LINEAR_BIAS,
    "layers/norm2": NORM_BIAS,
    "layers/w1": LINEAR_BIAS,
    "layers/w2": LINEAR_BIAS,
    "layers/w3": LINEAR_BIAS,
    "layers/ffn_ln": NORM_BIAS,
    "visual_fc": LINEAR_BIAS,
    "vit_eos": TENSOR,
}
VIDEO_KINDS = {"temporal_query_tokens": TENSOR, "temporal_visual_fc": LINEAR_BIAS}


def rules(*, lora_modules: Sequence[str] = (), video: bool = False) -> list[KeyRule]:
    """The abstractor's key table (with the temporal queries when `video`); `lora_modules` (full Flax module
    paths) add their adapters' keys."""
    out = module_rules(TOWER, HF_MODULES, KINDS, lora_modules=lora_modules)
    return out + (module_rules(TOWER, VIDEO_HF_MODULES, VIDEO_KINDS, lora_modules=lora_modules) if video else [])
