"""The mPLUG-Owl model: images (and videos) → ViT → abstractor → tokens spliced into LLaMA's input embeddings.

`input_ids` follow the released convention: each image occupies a run of `Q + 1` placeholder ids of -1
(Q = `num_query_tokens`), each video (the video layout) a run of `Q + 1` ids of -2, and the images in
`pixel_values` and the videos in `video_pixel_values` are each consumed in prompt order across the batch
(row 0's first, then row 1's, ...).

Unlike the released video code's `generate`, which restarts its image and video counters at every
placeholder run (so a second image or video in one prompt gets the first one's features), every run here
takes the next medium of its kind: a prompt may show several images and several videos, each with its own
features. With one image and one video per prompt both agree.
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
from owl_jax.modeling.llama import KVCache
from owl_jax.modeling.text import text_model
from owl_jax.modeling.vision import VisionTower

Array = jax.Array


IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = -1, -2
# placeholder id → (medium, the argument holding that medium, its prompt marker)
_MEDIA = {
    IMAGE_PLACEHOLDER: ("image", "pixel_values", "<image>"),
    VIDEO_PLACEHOLDER: ("video", "video_pixel_values", "<|video|>"),
}


def merge_media_embeddings(
    text_embeds: Array,
    input_ids: Array,
    media_embeds: Array,
    media_per_row: int | None = None,
    *,
    placeholder: int = IMAGE_PLACEHOLDER,
) -> Array:
    """Overwrite each run of `placeholder` ids with its medium's embeddings (static shapes, no host sync).

    A run starts where the id is `placeholder` and the id before it is not (or at position 0). Runs are
    numbered in row-major order over the batch; run r takes `media_embeds[r]`, one vector per position.
    With `media_per_row = M` (fixed slots, as in training batches) run r of row b instead takes
    `media_embeds[b * M + r]`, so rows with fewer media leave their spare slots unused. Runs of the other
    placeholder are left alone.

    Args:
      text_embeds: `(B, L, D)` embeddings of the text tokens (placeholders embedded as any valid id).
      input_ids: `(B, L)` with runs of `placeholder` (-1 images, -2 videos).
      media_embeds: `(N, T, D)`, one row per medium: N = number of runs in the batch, or B·M with slots.

    Returns:
      `(B, L, D)`.

    Example: with T = 2, ids `[[5, -1, -1, 7], [-1, -1, 9, 9]]` take image 0 at row 0, positions 1-2 and
    image 1 at row 1, positions 0-1.
    """
    if media_embeds.shape[0] == 0:
        return text_embeds
    b, length = input_ids.shape
    if text_embeds.shape[:2] != (b, length) or text_embeds.shape[-1] != media_embeds.shape[-1]:
        raise ValueError(
            f"text embeddings {text_embeds.shape}, ids {input_ids.shape} and {_MEDIA[placeholder][0]} embeddings "
            f"{media_embeds.shape} do not fit together"
        )
    is_media = input_ids == placeholder
    previous = jnp.concatenate([jnp.zeros_like(input_ids[:, :1]), input_ids[:, :-1]], axis=1)
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    run_start = is_media & ((pos == 0) | (previous != placeholder))
    if media_per_row is None:
        media_index = (jnp.cumsum(run_start.reshape(-1)) - 1).reshape(b, length)
    else:
        media_index = jnp.arange(b)[:, None] * media_per_row + jnp.cumsum(run_start, axis=1) - 1
    start_pos = jax.lax.cummax(jnp.where(run_start, pos, -1), axis=1)
    offset = pos - start_pos
    n, t, _ = media_embeds.shape
    inside = is_media & (offset < t)
    gathered = media_embeds[jnp.clip(media_index, 0, n - 1), jnp.clip(offset, 0, t - 1)]
    return jnp.where(inside[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def merge_image_embeddings(
    text_embeds: Array, input_ids: Array, image_embeds: Array, images_per_row: int | None = None
) -> Array:
    """`merge_media_embeddings` for the images: `(B, L, D)` with every run of -1 replaced by its image's
    `(N, T, D)` row."""
    return merge_media_embeddings(text_embeds, input_ids, image_embeds, images_per_row, placeholder=IMAGE_PLACEHOLDER)


def check_media_placeholders(input_ids: Any, tokens_per_medium: int, *, num_images: int, num_videos: int = 0) -> None:
    """Host-side check that the placeholder runs and the media agree; raises a one-line `ValueError` if not.

    Every negative id must be -1 (image) or -2 (video); each run must be exactly `tokens_per_medium` long
    (two `<image>` markers with no text between them make one run of twice that length, which the
    released code silently misaligns); and the batch must hold as many -1 runs as `num_images` and as many
    -2 runs as `num_videos`.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    runs = dict.fromkeys(_MEDIA, 0)
    for row_index, row in enumerate(ids):
        unknown = np.flatnonzero((row < 0) & (row != IMAGE_PLACEHOLDER) & (row != VIDEO_PLACEHOLDER))
        if unknown.size:
            raise ValueError(
                f"input_ids row {row_index} holds placeholder id {row[unknown[0]]} at position {unknown[0]}; "
                f"only -1 (<image>) and -2 (<|video|>) are known"
            )
        for placeholder, (medium, _, marker) in _MEDIA.items():
            inside = np.concatenate([[False], row == placeholder, [False]])
            starts = np.flatnonzero(~inside[:-1] & inside[1:])
            ends = np.flatnonzero(inside[:-1] & ~inside[1:])
            for s, e in zip(starts, ends):
                if e - s != tokens_per_medium:
                    raise ValueError(
                        f"input_ids row {row_index} has a run of {e - s} {medium} placeholders at position {s}; "
                        f"each {medium} takes exactly {tokens_per_medium} (num_query_tokens + 1). Adjacent "
                        f"{marker}{marker} markers need text between them, and truncation must not cut one."
                    )
            runs[placeholder] += len(starts)
    for placeholder, given in ((IMAGE_PLACEHOLDER, num_images), (VIDEO_PLACEHOLDER, num_videos)):
        medium, argument, _ = _MEDIA[placeholder]
        if runs[placeholder] != given:
            raise ValueError(
                f"input_ids hold {runs[placeholder]} {medium} placeholder runs but {argument} has {given} {medium}s"
            )


def check_image_placeholders(input_ids: Any, num_images: int, tokens_per_image: int) -> None:
    """`check_media_placeholders` for a batch of images and no videos."""
    check_media_placeholders(input_ids, tokens_per_image, num_images=num_images)


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
        self.vision_model = VisionTower(config.vision, temporal=config.video, **run)
        self.abstractor = Abstractor(
            config.abstractor, config.num_query_tokens, config.text.hidden_size, temporal=config.video, **run
        )
        self.language_model = text_model(config.text, **run)  # LLaMA or BLOOM
        if config.quant is not None:  # the selected linear layers held as integers and scales
            from owl_jax.quant.modules import quantize_linears

            quantize_linears(self, config.quant)

    # -- images and videos -----------------------------------------------------------------------
    def vision_features(self, pixel_values: Array, dropout_key: Array | None = None) -> Array:
        """The ViT output after the post-LayerNorm: images `(N, C, H, W)` → `(N, P, D_v)`; videos
        `(N, C, T, H, W)` (T >= 2, video layout) → `(N, T, P, D_v)`, P = 1 + H·W/p²."""
        if dropout_key is None and not isinstance(pixel_values, jax.core.Tracer):
            return _compiled(_vision_features, self.config.numerics)(*nnx.split(self), jnp.asarray(pixel_values))
        return self.vision_model(pixel_values, dropout_key)

    def encode_images(self, pixel_values: Array, dropout_key: Array | None = None) -> Array:
        """`(N, C, H, W)` → `(N, Q + 1, D_llm)`: what each image contributes to the LLM input."""
        if dropout_key is None and not isinstance(pixel_values, jax.core.Tracer):
            return _compiled(_encode_images, self.config.numerics)(*nnx.split(self), jnp.asarray(pixel_values))
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        return self.abstractor(self.vision_features(pixel_values, keys[0]), keys[1])

    def encode_videos(self, video_pixel_values: Array, dropout_key: Array | None = None) -> Array:
        """`(N, C, T, H, W)` (T >= 2, video layout) → `(N, Q + 1, D_llm)`: what each video contributes to the
        LLM input."""
        if np.ndim(video_pixel_values) != 5:
            raise ValueError(f"video_pixel_values must be (N, C, T, H, W), got shape {np.shape(video_pixel_values)}")
        return self.encode_images(video_pixel_values, dropout_key)

    # -- text + media ----------------------------------------------------------------------------
    def embed_inputs(
        self,
        input_ids: Array,
        image_embeds: Array | None,
        images_per_row: int | None = None,
        video_embeds: Array | None = None,
    ) -> Array:
        """Token embeddings with every placeholder run replaced by its image's or video's `(Q + 1)` vectors."""
        input_ids = jnp.asarray(input_ids)
        text = self.language_model.embed(jnp.where(input_ids < 0, 0, input_ids))
        if image_embeds is not None:
            text = merge_image_embeddings(text, input_ids, image_embeds, images_per_row)
        if video_embeds is not None:
            text = merge_media_embeddings(text, input_ids, video_embeds, placeholder=VIDEO_PLACEHOLDER)
        return text

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
        video_pixel_values: Array | None = None,
        video_embeds: Array | None = None,
    ) -> Array:
        """Traceable forward pass → float32 logits `(B, L, V)`; see `__call__`.

        `return_hidden=True` returns the LLM's final hidden states `(B, L, D)` instead (before `lm_head`;
        `language_model.logits` maps them to logits), for losses that never hold all logits at once.

        `image_embeds` (from `encode_images`) may be passed instead of `pixel_values`, and `video_embeds`
        (from `encode_videos`) instead of `video_pixel_values`. With `images_per_row = M`, `pixel_values`
        holds M image slots per row (`(B·M, C, H, W)`, spare slots unused) instead of the batch's images in
        order.

        `right_padded=True` promises that every row of `attention_mask` is ones then zeros: the LLM then
        runs plain causal attention (no padding mask), which gives the same result at every real token and
        lets fused attention kernels skip the mask; outputs at padding positions are unspecified.
        """
        input_ids = jnp.asarray(input_ids)
        b, length = input_ids.shape
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        if image_embeds is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_embeds = self.encode_images(pixel_values, keys[0])
        if video_embeds is None and video_pixel_values is not None and video_pixel_values.shape[0] > 0:
            video_key = None if keys[0] is None else jax.random.fold_in(keys[0], 1)
            video_embeds = self.encode_videos(video_pixel_values, video_key)
        embeds = self.embed_inputs(input_ids, image_embeds, images_per_row, video_embeds)
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        mask = None if right_padded else causal_padding_mask(jnp.asarray(attention_mask))
        hidden, _ = self.language_model(embeds, positions, mask, dropout_key=keys[1])
        return hidden if return_hidden else self.language_model.logits(hidden)

    def __call__(
        self,
        pixel_values: Array | None,
        input_ids: Array,
        attention_mask: Array | None = None,
        video_pixel_values: Array | None = None,
    ) -> Array:
        """Logits `(B, L, vocab)` in float32.

        Args:
          pixel_values: `(N, C, H, W)` normalised images for all -1 runs of the batch, in prompt order
            across the batch; None or N = 0 for none.
          input_ids: `(B, L)` ids with a run of `Q + 1` placeholders per image (-1) and per video (-2).
          attention_mask: `(B, L)`, 1 on real tokens, 0 on padding (default: all ones).
          video_pixel_values: `(M, C, T, H, W)` normalised videos (T >= 2 frames each, the video layout)
            for all -2 runs of the batch, in prompt order across the batch; None for none.

        Outside of a trace the placeholders are checked against the media and the pass is jit-compiled
        (with `ops.compiler_options` of the model's numerics).
        """
        if isinstance(input_ids, jax.core.Tracer):
            return self.forward(pixel_values, input_ids, attention_mask, video_pixel_values=video_pixel_values)
        num_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        num_videos = 0 if video_pixel_values is None else int(video_pixel_values.shape[0])
        check_media_placeholders(input_ids, self.config.image_tokens, num_images=num_images, num_videos=num_videos)
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
            None if num_videos == 0 else jnp.asarray(video_pixel_values),
        )

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache for `batch` rows of `length` positions in the compute dtype."""
        return KVCache.zeros(self.config.text, batch, length, self.config.dtype)


def _forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    pixel_values: Array,
    input_ids: Array,
    attention_mask: Array,
    video_pixel_values: Array | None = None,
) -> Array:
    return nnx.merge(graphdef, state).forward(
        pixel_values, input_ids, attention_mask, video_pixel_values=video_pixel_values
    )


def _vision_features(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Array) -> Array:
    return nnx.merge(graphdef, state).vision_model(pixel_values)


def _encode_images(graphdef: nnx.GraphDef, state: nnx.State, pixel_values: Array) -> Array:
    model = nnx.merge(graphdef, state)
    return model.abstractor(model.vision_model(pixel_values))


@functools.cache
def _compiled(fn: Callable, numerics: Numerics) -> Callable:
    """`fn` jitted with the model's graph static and the compiler options its numerics ask for."""
    return jax.jit(fn, static_argnums=0, compiler_options=ops.compiler_options(numerics))
