"""The released ViT's checkpoint keys: every `vision_model` parameter ↔ its tensor in mPLUG-Owl's checkpoint.

The module names come from `owl_jax.modeling.vision.HF_MODULES`; this table only says what kind each
module is (which `.weight`/`.bias` tensors it has and how they are laid out).
"""

from __future__ import annotations

from collections.abc import Sequence

from owl_jax.checkpoint.keys.targets import LINEAR_BIAS, NORM_BIAS, PATCH_CONV, TENSOR, KeyRule, module_rules
from owl_jax.modeling.vision import HF_MODULES

TOWER = "vision_model"
KINDS = {
    "patch_embed": PATCH_CONV,
    "cls_token": TENSOR,
    "position_embedding": TENSOR,
    "pre_layernorm": NORM_BIAS,
    "layers/input_layernorm": NORM_BIAS,
    "layers/query_key_value": LINEAR_BIAS,
    "layers/dense": LINEAR_BIAS,
    "layers/post_attention_layernorm": NORM_BIAS,
    "layers/fc1": LINEAR_BIAS,
    "layers/fc2": LINEAR_BIAS,
    "post_layernorm": NORM_BIAS,
}


def rules(*, lora_modules: Sequence[str] = ()) -> list[KeyRule]:
    """The ViT's key table; `lora_modules` (full Flax module paths) add their adapters' keys."""
    return module_rules(TOWER, HF_MODULES, KINDS, lora_modules=lora_modules)
