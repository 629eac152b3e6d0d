"""Batched generation over a preallocated KV cache.

Prompts arrive right-padded (the processor's layout) and are re-laid out left-padded, so every row's last
prompt token sits in the same cache slot and all rows advance one shared slot per step; each row keeps its
own RoPE positions (contiguous from 0 over its real tokens) and key mask. The prompt length is rounded up to
a bucket and the cache to a second one, so a new prompt length inside a bucket reuses the compiled prefill,
and decoding reuses one compiled loop of up to `decode_chunk` steps (the slot, the step and the number of
steps are traced values).

Greedy decoding reproduces the released model's `generate` (HF transformers 4.28); the tokens are chosen
as it chooses them (`owl_jax.inference.sampling`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax import ops
from owl_jax.inference.sampling import DecodeStructure, DecodeValues, GenerationConfig, select_tokens
from owl_jax.modeling._stack import unstack_layer_states
from owl_jax.modeling.llama import KVCache, can_fuse_projections
from owl_jax.modeling.llama import fuse_projections as fuse_layer
from owl_jax.modeling.owl import (
    VIDEO_PLACEHOLDER,
    Owl,
    check_media_placeholders,
    merge_image_embeddings,
    merge_media_embeddings,
)
from owl_jax.sharding import constrain, use_mesh

Array = jax.Array


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per row, up to and including EOS when it was produced
    finished: list[bool]  # whether each row stopped at EOS
    prompt_lengths: list[int]


def round_up(n: int, bucket: int) -> int:
    return max(bucket, -(-n // bucket) * bucket)


# ---------------------------------------------------------------------------------------------------
# Compiled pieces (pure functions of the split model state).


def _cache_axes(cache: KVCache) -> KVCache:
    if cache.per_layer:
        axes = ("batch", "act_heads", None, None)
        return KVCache(tuple(constrain(a, axes) for a in cache.k), tuple(constrain(a, axes) for a in cache.v))
    axes = (None, "batch", "act_heads", None, None)
    return KVCache(constrain(cache.k, axes), constrain(cache.v, axes))


def _merge(graphdef, params) -> tuple[Owl, dict[str, Any]]:
    """`Generator.state` → the model and the LLM's per-layer keyword arguments (`layer_states` None: the
    model's stacked layers; `fused`: concatenated projection kernels or None)."""
    state, layer_states, fused = params
    return nnx.merge(graphdef, state), {"layer_states": layer_states, "fused": fused}


def _prefill(graphdef, params, input_ids, mask, image_embeds, cache_len: int, video_embeds=None):
    """Run left-padded prompts `(B, P)` into a fresh cache of `cache_len` slots; logits of the last slot."""
    model, llm_args = _merge(graphdef, params)
    b, p = input_ids.shape
    embeds = model.language_model.embed(jnp.where(input_ids < 0, 0, input_ids))
    if image_embeds is not None:
        embeds = merge_image_embeddings(embeds, input_ids, image_embeds)
    if video_embeds is not None:
        embeds = merge_media_embeddings(embeds, input_ids, video_embeds, placeholder=VIDEO_PLACEHOLDER)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    slots = jnp.arange(cache_len)
    key_valid = jnp.pad(mask > 0, ((0, 0), (0, cache_len - p)))
    attend = (slots[None, None, :] <= jnp.arange(p)[None, :, None]) & key_valid[:, None, :]
    cache = _cache_axes(
        KVCache.zeros(
            model.config.text, b, cache_len, model.config.dtype, per_layer=llm_args["layer_states"] is not None
        )
    )
    hidden, cache = model.language_model(embeds, positions, attend, cache=cache, cache_index=0, **llm_args)
    logits = model.language_model.logits(hidden[:, -1:])[:, 0]
    return logits, _cache_axes(cache), key_valid


def _extend(graphdef, params, cache, key_valid, input_ids, n_real, start, image_embeds):
    """Append one row's tokens `(1, n)` (the first `n_real` real) at cache slot `start`; logits of the last real one.

    Slots from `start + n_real` on become invalid, so a conversation can branch from any earlier point.
    """
    model, llm_args = _merge(graphdef, params)
    n = input_ids.shape[1]
    embeds = model.language_model.embed(jnp.where(input_ids < 0, 0, input_ids))
    if image_embeds is not None:
        embeds = merge_image_embeddings(embeds, input_ids, image_embeds)
    slots = jnp.arange(key_valid.shape[1])
    key_valid = key_valid & (slots < start)[None] | ((slots >= start) & (slots < start + n_real))[None]
    query_slots = start + jnp.arange(n)
    attend = (slots[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :]
    hidden, cache = model.language_model(embeds, query_slots[None], attend, cache=cache, cache_index=start, **llm_args)
    last = jax.lax.dynamic_slice_in_dim(hidden, n_real - 1, 1, axis=1)
    return model.language_model.logits(last)[:, 0], _cache_axes(cache), key_valid


def _decode(graphdef, params, cache, tokens, positions, slot, key_valid):
    """One token per row at cache `slot` → logits `(B, V)` and the updated cache and key mask."""
    model, llm_args = _merge(graphdef, params)
    key_valid = key_valid.at[:, slot].set(True)
    embeds = model.language_model.embed(tokens[:, None])
    hidden, cache = model.language_model(
        embeds, positions[:, None], key_valid[:, None, :], cache=cache, cache_index=slot, **llm_args
    )
    return model.language_model.logits(hidden)[:, 0], _cache_axes(cache), key_valid


def _decode_select(
    graphdef, params, cache, key_valid, tokens, positions, slot, history, step, key, finished, structure, values
):
    """Feed `tokens` (step `step - 1`'s picks) and pick step `step`'s, all on the device."""
    logits, cache, key_valid = _decode(graphdef, params, cache, tokens, positions, slot, key_valid)
    key, sub = jax.random.split(key)
    history_len = jnp.full(tokens.shape, step + 1, jnp.int32)
    picked = select_tokens(logits, step, history, history_len, sub, structure, values)
    picked = jnp.where(finished, structure.pad_token_id, picked)
    history = jax.lax.dynamic_update_slice(history, picked[:, None], (0, step + 1))
    return picked, finished | (picked == structure.eos_token_id), history, key, cache, key_valid


def _decode_chunk(
    graphdef, params, carry, positions, slot, limit, count, values: DecodeValues, structure: DecodeStructure, chunk: int
):
    """Up to `count` (at most `chunk`) decode steps in one on-device loop, so the host dispatches and reads
    once per chunk rather than once per token.

    `carry` is `(step, tokens, finished, history, key, cache, key_valid)`: `tokens` are step `step`'s picks,
    not yet fed. Each iteration feeds them at cache slot `slot + step` and picks step `step + 1`'s; the loop
    stops early once every row has finished or step `limit - 1` has been picked, so a chunk queued after the
    end runs no step and the cache never holds the last pick. Returns the new carry, the picks `(B, chunk)`
    and how many steps ran (the picks' real columns).
    """

    def cond(state):
        i, (step, _, finished, *_rest), _ = state
        return (i < count) & (step + 1 < limit) & ~jnp.all(finished)

    def body(state):
        i, (step, tokens, finished, history, key, cache, key_valid), picks = state
        picked, finished, history, key, cache, key_valid = _decode_select(
            graphdef,
            params,
            cache,
            key_valid,
            tokens,
            positions + step,
            slot + step,
            history,
            step + 1,
            key,
            finished,
            structure,
            values,
        )
        picks = jax.lax.dynamic_update_slice(picks, picked[:, None], (0, i))
        return i + 1, (step + 1, picked, finished, history, key, cache, key_valid), picks

    picks = jnp.full((carry[1].shape[0], chunk), structure.pad_token_id, jnp.int32)
    ran, carry, picks = jax.lax.while_loop(cond, body, (jnp.int32(0), carry, picks))
    step, tokens, finished, history, key, cache, key_valid = carry
    return (step, tokens, finished, history, key, _cache_axes(cache), key_valid), picks, ran


def _first_select(logits, history, key, structure: DecodeStructure, values: DecodeValues):
    """Step 0's picks from the prefill logits (same processors and key sequence as `_decode_select`)."""
    key, sub = jax.random.split(key)
    b = logits.shape[0]
    picked = select_tokens(logits, jnp.int32(0), history, jnp.ones((b,), jnp.int32), sub, structure, values)
    history = history.at[:, 1].set(picked)
    return picked, picked == structure.eos_token_id, history, key


class Generator:
    """Generation for one model; compiled functions are cached per bucket and reused across calls.

    Args:
      model: an `Owl` (sharded or not).
      mesh: the mesh the model lives on; activations and the cache are constrained to it.
      prompt_bucket, cache_bucket: prompt lengths and cache lengths are rounded up to these multiples.
      unstack_layers: run the LLM from a copy of its layer weights held as one buffer per layer (an
        unrolled loop) instead of slicing each layer out of the stacked weights: on a GPU the slice is a
        copy that triples a decode step's weight traffic. The copy costs the LLM layers' memory once more
        while the model's own stacked weights are alive. The KV cache is then one buffer per layer too
        (`KVCache.per_layer`), so a step updates it in place rather than restacking it.
      fuse_projections: with `unstack_layers`, also concatenate each layer's q/k/v and gate/up kernels
        (into the copy, whose separate kernels are dropped), so a decode step runs two matmuls where it
        ran five; skipped for layers with adapters and for tensor-parallel meshes.
      compiler_options: XLA options for the generator's compiled steps (`jax.jit(compiler_options=...)`),
        e.g. `{"xla_gpu_enable_triton_gemm": False}`, on top of those the model's numerics ask for
        (`ops.compiler_options`).
    """

    def __init__(
        self,
        model: Owl,
        *,
        mesh: jax.sharding.Mesh | None = None,
        prompt_bucket: int = 64,
        cache_bucket: int = 128,
        unstack_layers: bool = False,
        fuse_projections: bool = True,
        compiler_options: dict[str, Any] | None = None,
        decode_chunk: int = 16,
        stream_interval: float = 0.05,
    ):
        if decode_chunk < 1 or stream_interval < 0:
            raise ValueError(
                f"decode_chunk must be >= 1 and stream_interval >= 0, got {decode_chunk} and {stream_interval}"
            )
        self.model, self.mesh = model, mesh
        self.decode_chunk, self.stream_interval = int(decode_chunk), float(stream_interval)
        self.prompt_bucket, self.cache_bucket = prompt_bucket, cache_bucket
        self.graphdef, state = nnx.split(model)
        layer_states = fused = None
        if unstack_layers:
            with use_mesh(mesh):
                layers, n = model.language_model.layers, model.config.text.num_layers
                tensor_parallel = mesh is not None and dict(mesh.shape).get("tensor", 1) > 1
                if fuse_projections and can_fuse_projections(layers) and not tensor_parallel:
                    pairs = unstack_layer_states(layers, n, transform=fuse_layer)
                    layer_states, fused = [p[0] for p in pairs], [p[1] for p in pairs]
                else:
                    layer_states = unstack_layer_states(layers, n)
            # The generator's own state drops its reference to the stacked layer weights (never read now).
            llm = state["language_model"]
            llm["layers"] = jax.tree.map(lambda a: jnp.zeros((), a.dtype), llm["layers"])
        self.state = (state, layer_states, fused)
        options = {**(ops.compiler_options(model.config.numerics) or {}), **(compiler_options or {})}
        jit = functools.partial(jax.jit, compiler_options=options or None)
        self.prefill = jit(_prefill, static_argnums=(0, 5))
        self.decode = jit(_decode, static_argnums=(0,), donate_argnums=(2,))
        self.extend = jit(_extend, static_argnums=(0,), donate_argnums=(2,))
        self.first_select = jit(_first_select, static_argnums=(3,))
        self.decode_chunk_fn = jit(_decode_chunk, static_argnums=(0, 8, 9), donate_argnums=(2,))
        self.encode = jit(lambda params, px: _merge(self.graphdef, params)[0].encode_images(px))
        self.encode_video = jit(lambda params, px: _merge(self.graphdef, params)[0].encode_videos(px))

    def new_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache in the layout this generator's steps take."""
        cfg = self.model.config
        with self._ctx():
            return KVCache.zeros(cfg.text, batch, length, cfg.dtype, per_layer=self.state[1] is not None)

    def _ctx(self):
        return use_mesh(self.mesh)

    def encode_images(self, pixel_values: np.ndarray | None) -> Array | None:
        if pixel_values is None or len(pixel_values) == 0:
            return None
        with self._ctx():
            return self.encode(self.state, jnp.asarray(pixel_values))

    def encode_videos(self, video_pixel_values: np.ndarray | None) -> Array | None:
        if video_pixel_values is None or len(video_pixel_values) == 0:
            return None
        with self._ctx():
            return self.encode_video(self.state, jnp.asarray(video_pixel_values))

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        pixel_values: np.ndarray | None = None,
        config: GenerationConfig = GenerationConfig(),
        video_pixel_values: np.ndarray | None = None,
        *,
        image_embeds: Array | None = None,
        stream: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    ) -> GenerationOutput:
        """Generate for a batch of right-padded prompts (the processor's output).

        Args:
          input_ids: `(B, L)` with runs of -1 for images and of -2 for videos, right-padded.
          attention_mask: `(B, L)` 1 on real tokens (default: all).
          pixel_values: `(N, C, H, W)` the batch's images in prompt order (or pass `image_embeds`).
          video_pixel_values: `(M, C, T, H, W)` the batch's videos in prompt order (the video layout).
          stream: called after every step with `(step, tokens (B,), finished (B,))` on the host.
        """
        cfg = config.validate()
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        lengths = mask.sum(axis=1)
        if (lengths == 0).any():
            raise ValueError("every prompt needs at least one token")
        n_videos = 0 if video_pixel_values is None else len(video_pixel_values)
        if image_embeds is None:
            n_images = 0 if pixel_values is None else len(pixel_values)
            check_media_placeholders(
                np.where(mask > 0, ids, 0), self.model.config.image_tokens, num_images=n_images, num_videos=n_videos
            )
            image_embeds = self.encode_images(pixel_values)
        video_embeds = self.encode_videos(video_pixel_values)
        b = ids.shape[0]
        p = round_up(int(lengths.max()), self.prompt_bucket)
        cache_len = round_up(p + cfg.max_new_tokens, self.cache_bucket)
        if cache_len > self.model.config.text.max_position_embeddings * 4:
            raise ValueError(f"prompt + max_new_tokens needs {cache_len} cache slots; that is too long")
        left_ids = np.full((b, p), cfg.pad_token_id, np.int32)
        left_mask = np.zeros((b, p), np.int32)
        for row in range(b):  # right padding → left padding
            n = int(lengths[row])
            left_ids[row, p - n :] = ids[row, :n]
            left_mask[row, p - n :] = 1
        with self._ctx():
            prompts = (jnp.asarray(left_ids), jnp.asarray(left_mask), image_embeds, cache_len, video_embeds)
            logits, cache, key_valid = self.prefill(self.graphdef, self.state, *prompts)
        generated, finished, _, _ = self.decode_loop(logits, cache, key_valid, lengths, p, cfg, stream)
        return GenerationOutput(generated, finished.tolist(), lengths.tolist())

    def decode_loop(
        self,
        logits: Array,
        cache: KVCache,
        key_valid: Array,
        positions: np.ndarray,
        slot: int,
        cfg: GenerationConfig,
        stream: Callable | None = None,
    ):
        """Pick tokens from `logits` and keep feeding them until EOS or `max_new_tokens`.

        Args:
          positions: `(B,)` RoPE position of each row's first generated token.
          slot: cache slot of the first generated token.

        Returns:
          `(tokens per row, finished (B,), cache, key_valid)`; the cache holds every generated token but
          the last (which was never fed back).
        """
        b = logits.shape[0]
        # The compiled steps depend only on the options' structure: the seed only seeds `key`, max_new_tokens
        # is the traced `limit` (the token history is padded to a bucket) and the sampling numbers are traced
        # values, so a server compiles them once however its requests set those.
        structure = cfg.structure()
        history = np.zeros((b, round_up(cfg.max_new_tokens + 1, self.cache_bucket)), np.int32)
        history[:, 0] = cfg.bos_token_id
        generated = np.zeros((b, cfg.max_new_tokens), np.int32)
        with self._ctx():
            values = jax.tree.map(jnp.asarray, cfg.values())
            tokens, done, history, key = self.first_select(
                logits, jnp.asarray(history), jax.random.key(cfg.seed), structure, values
            )
            carry = (jnp.int32(0), tokens, done, history, key, cache, key_valid)
            fixed = (jnp.asarray(positions, jnp.int32), jnp.int32(slot), jnp.int32(cfg.max_new_tokens))
        # Decoding runs in chunks of up to `decode_chunk` steps, each one on-device loop, and the device runs
        # one chunk ahead of the host: chunk k + 1 is queued before chunk k's tokens are read, so the host's
        # work (reading tokens, streaming, queueing) overlaps the device's. A chunk queued after the last
        # token runs no step. With a `stream`, chunks start at one step and grow while a chunk takes less
        # than `stream_interval` seconds, so tokens still reach the stream that often.
        count = 1 if stream is not None else self.decode_chunk
        pending = (tokens[:, None], 1)
        finished = np.zeros((b,), bool)
        steps, last = 0, time.perf_counter()
        while True:
            with self._ctx():
                carry, picks, ran = self.decode_chunk_fn(
                    self.graphdef, self.state, carry, *fixed, jnp.int32(count), values, structure, self.decode_chunk
                )
            block, n = jax.device_get(pending)
            for column in np.asarray(block)[:, : int(n)].T:
                finished = finished | (column == cfg.eos_token_id)
                generated[:, steps] = column
                if stream is not None:
                    stream(steps, column.copy(), finished.copy())
                steps += 1
            if steps == cfg.max_new_tokens or finished.all():
                break
            pending = (picks, ran)
            if stream is not None and n:
                now = time.perf_counter()
                per_step, last = (now - last) / int(n), now
                count = int(min(self.decode_chunk, max(1, self.stream_interval // max(per_step, 1e-6))))
        out = []
        for row in range(b):
            row_tokens = generated[row, :steps].tolist()
            if cfg.eos_token_id in row_tokens:
                row_tokens = row_tokens[: row_tokens.index(cfg.eos_token_id) + 1]
            out.append(row_tokens)
        return out, finished, carry[5], carry[6]


def generate(
    model: Owl,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    video_pixel_values: np.ndarray | None = None,
    **options: Any,
) -> GenerationOutput:
    """One-off generation (builds a `Generator`; keep one around to reuse its compiled steps)."""
    return Generator(model).generate(
        input_ids, attention_mask, pixel_values, GenerationConfig(**options), video_pixel_values
    )
