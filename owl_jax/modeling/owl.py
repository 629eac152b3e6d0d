"""The mPLUG-Owl model: images → ViT → abstractor → tokens spliced into LLaMA's input embeddings.

`input_ids` follow the released convention: each image occupies a run of `Q + 1` placeholder ids of -1
(Q = `num_query_tokens`), and the images in `pixel_values` are consumed in prompt order across the
batch (row 0's images first, then row 1's, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax import ops
from owl_jax.config import Numerics, OwlConfig
from owl_jax.modeling.abstractor import Abstractor
from owl_jax.modeling.llama import KVCache, LlamaModel
from owl_jax.modeling.vision import VisionTower

Array = jax.Array


def merge_image_embeddings(
    text_embeds: Array, input_ids: Array, image_embeds: Array, images_per_row: int | None = None
) -> Array:
    """Overwrite each run of negative ids with its image's embeddings (static shapes, no host sync).

    A run starts where an id is negative and differs from the id before it (or at position 0). Runs are
    numbered in row-major order over the batch; run r takes `image_embeds[r]`, one vector per position.
    With `images_per_row = M` (fixed image slots, as in training batches) run r of row b instead takes
    `image_embeds[b * M + r]`, so rows with fewer images leave their spare slots unused.

    Args:
      text_embeds: `(B, L, D)` embeddings of the text tokens (placeholders embedded as any valid id).
      input_ids: `(B, L)` with -1 placeholders.
      image_embeds: `(N, T, D)`, one row per image: N = number of runs in the batch, or B·M with slots.

    Returns:
      `(B, L, D)`.

    Example: with T = 2, ids `[[5, -1, -1, 7], [-1, -1, 9, 9]]` take image 0 at row 0, positions 1-2 and
    image 1 at row 1, positions 0-1.
    """
    if image_embeds.shape[0] == 0:
        return text_embeds
    b, length = input_ids.shape
    if text_embeds.shape[:2] != (b, length) or text_embeds.shape[-1] != image_embeds.shape[-1]:
        raise ValueError(
            f"text embeddings {text_embeds.shape}, ids {input_ids.shape} and image embeddings "
            f"{image_embeds.shape} do not fit together"
        )
    is_image = input_ids < 0
    previous = jnp.concatenate([jnp.zeros_like(input_ids[:, :1]), input_ids[:, :-1]], axis=1)
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    run_start = is_image & ((pos == 0) | (input_ids != previous))
    if images_per_row is None:
        image_index = (jnp.cumsum(run_start.reshape(-1)) - 1).reshape(b, length)
    else:
        image_index = jnp.arange(b)[:, None] * images_per_row + jnp.cumsum(run_start, axis=1) - 1
    start_pos = jax.lax.cummax(jnp.where(run_start, pos, -1), axis=1)
    offset = pos - start_pos
    n, t, _ = image_embeds.shape
    inside = is_image & (offset < t)
    gathered = image_embeds[jnp.clip(image_index, 0, n - 1), jnp.clip(offset, 0, t - 1)]
    return jnp.where(inside[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def check_image_placeholders(input_ids: Any, num_images: int, tokens_per_image: int) -> None:
    """Host-side check that the placeholder runs and the images agree; raises `ValueError` if not.

    Each run of negative ids must be exactly `tokens_per_image` long (two `<image>` markers with no text
    between them make one run of twice that length, which the released code silently misaligns), and
    the number of runs must equal the number of images.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    runs = []
    for row_index, row in enumerate(ids):
        neg = np.concatenate([[False], row < 0, [False]])
        starts = np.flatnonzero(~neg[:-1] & neg[1:])
        ends = np.flatnonzero(neg[:-1] & ~neg[1:])
        for s, e in zip(starts, ends):
            if e - s != tokens_per_image:
                raise ValueError(
                    f"input_ids row {row_index} has a run of {e - s} image placeholders at position {s}; each image "
                    f"takes exactly {tokens_per_image} (num_query_tokens + 1). Adjacent <image><image> markers "
                    f"need text between them, and truncation must not cut an image."
                )
            runs.append((row_index, s))
    if len(runs) != num_images:
        raise ValueError(f"input_ids hold {len(runs)} image placeholder runs but pixel_values has {num_images} images")


def causal_padding_mask(attention_mask: Array) -> Array:
    """`(B, L)` 0/1 key mask → `(B, L, L)` boolean: query i sees keys j <= i that are not padding."""
    length = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return causal[None] & (attention_mask[:, None, :] > 0)


class Owl(nnx.Module):
    """mPLUG-Owl: `vision_model` (f_V), `abstractor` (f_K, with the queries), `language_model` (f_L)."""

    def __init__(self, config: OwlConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        run = dict(
            lora=config.lora,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            scan_layers=config.scan_layers,
            remat_policy=config.remat_policy,
            numerics=config.numerics,
            rngs=rngs,
        )
        self.vision_model = VisionTower(config.vision, **run)
        self.abstractor = Abstractor(config.abstractor, config.num_query_tokens, config.text.hidden_size, **run)
        self.language_model = LlamaModel(config.text, **run)

    # -- images ----------------------------------------------------------------------------------
    def vision_features(self, pixel_values: Array, dropout_key: Array | None = None) -> Array:
        """`(N, C, H, W)` normalised pixels → `(N, T, D_v)` ViT output after the post-LayerNorm."""
        if dropout_key is None and not isinstance(pixel_values, jax.core.Tracer):
            return _compiled(_vision_features, self.config.numerics)(*nnx.split(self), jnp.asarray(pixel_values))
        return self.vision_model(pixel_values, dropout_key)

    def encode_images(self, pixel_values: Array, dropout_key: Array | None = None) -> Array:
        """`(N, C, H, W)` → `(N, Q + 1, D_llm)`: what each image contributes to the LLM input."""
        if dropout_key is None and not isinstance(pixel_values, jax.core.Tracer):
            return _compiled(_encode_images, self.config.numerics)(*nnx.split(self), jnp.asarray(pixel_values))
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        return self.abstractor(self.vision_features(pixel_values, keys[0]), keys[1])

    # -- text + images ---------------------------------------------------------------------------
    def embed_inputs(self, input_ids: Array, image_embeds: Array | None, images_per_row: int | None = None) -> Array:
        """Token embeddings with every placeholder run replaced by its image's `(Q + 1)` vectors."""
        input_ids = jnp.asarray(input_ids)
        text = self.language_model.embed(jnp.where(input_ids < 0, 0, input_ids))
        if image_embeds is None:
            return text
        return merge_image_embeddings(text, input_ids, image_embeds, images_per_row)

    def forward(
        self,
        pixel_values: Array | None,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        positions: Array | None = None,
        image_embeds: Array | None = None,
        images_per_row: int | None = None,
        dropout_key: Array | None = None,
        return_hidden: bool = False,
        right_padded: bool = False,
    ) -> Array:
        """Traceable forward pass → float32 logits `(B, L, V)`; see `__call__`.

        `return_hidden=True` returns the LLM's final hidden states `(B, L, D)` instead (before `lm_head`;
        `language_model.logits` maps them to logits), for losses that never hold all logits at once.

        `image_embeds` (from `encode_images`) may be passed instead of `pixel_values`. With
        `images_per_row = M`, `pixel_values` holds M image slots per row (`(B·M, C, H, W)`, spare slots
        unused) instead of the batch's images in order.

        `right_padded=True` promises that every row of `attention_mask` is ones then zeros: the LLM then
        runs plain causal attention (no padding mask), which gives the same result at every real token and
        lets fused attention kernels skip the mask; outputs at padding positions are unspecified.
        """
        input_ids = jnp.asarray(input_ids)
        b, length = input_ids.shape
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        if image_embeds is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values, keys[0])
        embeds = self.embed_inputs(input_ids, image_embeds, images_per_row)
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        mask = None if right_padded else causal_padding_mask(jnp.asarray(attention_mask))
        hidden, _ = self.language_model(embeds, positions, mask, dropout_key=keys[1])
        return hidden if return_hidden else self.language_model.logits(hidden)

    def __call__(self, pixel_values: Array | None, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Logits `(B, L, vocab)` in float32.

        Args:
          pixel_values: `(N, C, H, W)` normalised images for all placeholder runs of the batch, in prompt
            order across the batch; None or N = 0 for text only.
          input_ids: `(B, L)` ids with runs of `Q + 1` placeholders (-1) per image.
          attention_mask: `(B, L)`, 1 on real tokens, 0 on padding (default: all ones).

        Outside of a trace the placeholders are checked against the images and the pass is jit-compiled
        (with `ops.compiler_options` of the model's numerics).
        """
        if isinstance(input_ids, jax.core.Tracer):
            return self.forward(pixel_values, input_ids, attention_mask)
        num_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        check_image_placeholders(input_ids, num_images, self.config.image_tokens)
        if pixel_values is None:
            v = self.config.vision
            pixel_values = np.zeros((0, v.num_channels, v.image_size, v.image_size), np.float32)
        if attention_mask is None:
            attention_mask = np.ones(np.shape(input_ids), np.int32)
        return _compiled(_forward, self.config.numerics)(
            *nnx.split(self),
            jnp.asarray(pixel_values),
            jnp.asarray(input_ids, jnp.int32),
            jnp.asarray(attention_mask, jnp.int32),
        )

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache for `batch` rows of `length` positions in the compute dtype."""
        return KVCache.zeros(self.config.text, batch, length, self.config.dtype)


def _forward(
    graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Array, input_ids: Array, attention_mask: Array
) -> Array:
    return nnx.merge(graphdef, state).forward(pixel_values, input_ids, attention_mask)


def _vision_features(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Array) -> Array:
    return nnx.merge(graphdef, state).vision_model(pixel_values)


def _encode_images(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Array) -> Array:
    model = nnx.merge(graphdef, state)
    return model.abstractor(model.vision_model(pixel_values))


@functools.cache
def _compiled(fn: Callable, numerics: Numerics) -> Callable:
    """`fn` jitted with the model's graph static and the compiler options its numerics ask for."""
    return jax.jit(fn, static_argnums=0, compiler_options=ops.compiler_options(numerics))
