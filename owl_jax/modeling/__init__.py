"""Flax NNX modules of mPLUG-Owl: ViT (f_V), visual abstractor (f_K), LLaMA or BLOOM (f_L) and the joined model."""

from owl_jax.modeling.abstractor import Abstractor
from owl_jax.modeling.bloom import BloomModel
from owl_jax.modeling.llama import KVCache, LlamaModel
from owl_jax.modeling.loss import masked_next_token_loss, next_token_loss_sums
from owl_jax.modeling.owl import (
    Owl,
    causal_padding_mask,
    check_image_placeholders,
    check_media_placeholders,
    merge_image_embeddings,
    merge_media_embeddings,
)
from owl_jax.modeling.vision import VisionTower

__all__ = [
    "Abstractor",
    "BloomModel",
    "KVCache",
    "LlamaModel",
    "Owl",
    "VisionTower",
    "causal_padding_mask",
    "check_image_placeholders",
    "check_media_placeholders",
    "masked_next_token_loss",
    "merge_image_embeddings",
    "merge_media_embeddings",
    "next_token_loss_sums",
]
