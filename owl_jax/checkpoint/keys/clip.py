"""HF CLIP vision checkpoints → our ViT: the key table `init` uses to start the vision tower from CLIP.

The folder holds a `CLIPVisionModel` or a whole `CLIPModel` (its text tower and projections are
ignored). Keys are listed without the `vision_model.` prefix: transformers 5 saves a `CLIPVisionModel`
without it, while `CLIPModel` (and older `CLIPVisionModel` files) carry it; `strip_prefix` removes it
when the files are scanned.

CLIP keeps q, k and v as separate linear layers (`qkv_part` writes each into the fused, head-interleaved
`query_key_value` leaf), stores the class embedding and position embeddings without their broadcast axes
(`reshape`), and spells its first LayerNorm `pre_layrnorm`.
"""

from __future__ import annotations

import re

from owl_jax.checkpoint.keys.targets import COPY, LINEAR, PATCH, QKV_PART, RESHAPE, KeyRule, KeyTarget, expand
from owl_jax.checkpoint.leaves import Shapes
from owl_jax.config import VisionConfig

PREFIX = "vision_model."
LAYER = "encoder.layers.{i}."

# (Flax leaf inside `vision_model`, CLIP key without `vision_model.`, transform, q/k/v part).
_TABLE: tuple[tuple[str, str, str, int], ...] = (
    ("patch_embed", "embeddings.patch_embedding.weight", PATCH, 0),
    ("cls_token", "embeddings.class_embedding", RESHAPE, 0),
    ("position_embedding", "embeddings.position_embedding.weight", RESHAPE, 0),
    ("pre_layernorm/scale", "pre_layrnorm.weight", COPY, 0),  # sic: HF's spelling
    ("pre_layernorm/bias", "pre_layrnorm.bias", COPY, 0),
    ("layers/input_layernorm/scale", LAYER + "layer_norm1.weight", COPY, 0),
    ("layers/input_layernorm/bias", LAYER + "layer_norm1.bias", COPY, 0),
    ("layers/query_key_value/kernel", LAYER + "self_attn.q_proj.weight", QKV_PART, 0),
    ("layers/query_key_value/kernel", LAYER + "self_attn.k_proj.weight", QKV_PART, 1),
    ("layers/query_key_value/kernel", LAYER + "self_attn.v_proj.weight", QKV_PART, 2),
    ("layers/query_key_value/bias", LAYER + "self_attn.q_proj.bias", QKV_PART, 0),
    ("layers/query_key_value/bias", LAYER + "self_attn.k_proj.bias", QKV_PART, 1),
    ("layers/query_key_value/bias", LAYER + "self_attn.v_proj.bias", QKV_PART, 2),
    ("layers/dense/kernel", LAYER + "self_attn.out_proj.weight", LINEAR, 0),
    ("layers/dense/bias", LAYER + "self_attn.out_proj.bias", COPY, 0),
    ("layers/post_attention_layernorm/scale", LAYER + "layer_norm2.weight", COPY, 0),
    ("layers/post_attention_layernorm/bias", LAYER + "layer_norm2.bias", COPY, 0),
    ("layers/fc1/kernel", LAYER + "mlp.fc1.weight", LINEAR, 0),
    ("layers/fc1/bias", LAYER + "mlp.fc1.bias", COPY, 0),
    ("layers/fc2/kernel", LAYER + "mlp.fc2.weight", LINEAR, 0),
    ("layers/fc2/bias", LAYER + "mlp.fc2.bias", COPY, 0),
    ("post_layernorm/scale", "post_layernorm.weight", COPY, 0),
    ("post_layernorm/bias", "post_layernorm.bias", COPY, 0),
)
RULES = tuple(KeyRule(("vision_model",) + tuple(p.split("/")), k, t, part) for p, k, t, part in _TABLE)

# Tensors the ViT does not use: CLIP's text tower and contrastive head, and `position_ids` buffers
# (older transformers saved them; they always hold arange(T)).
IGNORED = re.compile(
    r"text_model\..*|visual_projection\.weight|text_projection\.weight|logit_scale"
    r"|(.*\.)?position_ids"
)


def strip_prefix(key: str) -> str:
    """A CLIP file key as the table lists it (without `vision_model.`)."""
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def targets(vision: VisionConfig, shapes: Shapes) -> list[KeyTarget]:
    """Every tensor of a CLIP ViT checkpoint (keys without `vision_model.`) and the `Owl` leaf it fills.

    Args:
      vision: the ViT config.
      shapes: `{path: (shape, dtype)}` of the model's leaves (`leaf_shapes` of `abstract_model`).

    Returns:
      Targets whose `hf_shape` is CLIP's: q/k/v weights `(D, D)` and biases `(D,)` (written into the fused
      `(D, 3D)` / `(3D,)` leaf), `class_embedding` `(D,)`, `position_embedding.weight` `(T, D)`,
      `patch_embedding.weight` `(D, C, p, p)`.
    """
    return expand(
        RULES, shapes, vision.num_layers, patch=(vision.num_channels, vision.patch_size), num_heads=vision.num_heads
    )
