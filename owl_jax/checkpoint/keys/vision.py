"""The released ViT's checkpoint keys: every `vision_model` parameter ↔ its tensor in mPLUG-Owl's checkpoint.

The module names come from `owl_jax.modeling.vision.HF_MODULES`; this table only says what kind each
module is (which `.weight`/`.bias` tensors it has and how they are laid out). The video layout adds a
temporal module to every layer (`VIDEO_HF_MODULES`): its 1×1×1 Conv3d weights `(out, in, 1, 1, 1)` fill
`Linear` kernels, its depthwise Conv3d `(C, 1, 3, 1, 1)` the taps `(3, C)`.
"""

from __future__ import annotations

from collections.abc import Sequence

from owl_jax.checkpoint.keys.targets import (
    LINEAR_BIAS,
    NORM_BIAS,
    PATCH_CONV,
    POINTWISE_CONV_BIAS,
    TENSOR,
    TIME_CONV_BIAS,
    KeyRule,
    module_rules,
)
from owl_jax.modeling.vision import HF_MODULES, VIDEO_HF_MODULES

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
VIDEO_KINDS = {
    "layers/temporal/ln": NORM_BIAS,
    "layers/temporal/down_proj": POINTWISE_CONV_BIAS,
    "layers/temporal/conv": TIME_CONV_BIAS,
    "layers/temporal/up_proj": POINTWISE_CONV_BIAS,
}


def rules(*, lora_modules: Sequence[str] = (), video: bool = False) -> list[KeyRule]:
    """The ViT's key table (with the temporal modules when `video`); `lora_modules` (full Flax module paths)
    add their adapters' keys."""
    out = module_rules(TOWER, HF_MODULES, KINDS, lora_modules=lora_modules)
    return out + (module_rules(TOWER, VIDEO_HF_MODULES, VIDEO_KINDS, lora_modules=lora_modules) if video else [])
