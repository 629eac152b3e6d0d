"""Batched generation over a preallocated KV cache.

Prompts arrive right-padded (the processor's layout) and are re-laid out left-padded, so every row's last
prompt token sits in the same cache slot and all rows advance one shared slot per step; each row keeps its
own RoPE positions (contiguous from 0 over its real tokens) and key mask. The prompt length is rounded up to
a bucket and the cache to a second one, so a new prompt length inside a bucket reuses the compiled prefill,
and decoding reuses one compiled loop of up to `decode_chunk` steps (the slot, the step and the number of
steps are traced values).

Greedy decoding and beam search reproduce the released model's `generate` (HF transformers 4.28); the
tokens are chosen as it chooses them (`owl_jax.inference.sampling`; beam search over this cache:
`owl_jax.inference.beam`). Stop strings end a row once its decoded text holds one (`owl_jax.inference.stops`).
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
from owl_jax.inference.beam import BeamSearch, Hypothesis
from owl_jax.inference.sampling import DecodeStructure, DecodeValues, GenerationConfig, select_tokens
from owl_jax.inference.steps import _cache_axes, _decode, _extend, _merge, _prefill
from owl_jax.inference.stops import cut_at_stop, stop_scanner
from owl_jax.modeling._stack import unstack_layer_states
from owl_jax.modeling.llama import KVCache, can_fuse_projections
from owl_jax.modeling.llama import fuse_projections as fuse_layer
from owl_jax.modeling.owl import Owl, check_media_placeholders
from owl_jax.sharding import use_mesh

Array = jax.Array


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per row, up to and including EOS or the token completing a stop string
    finished: list[bool]  # whether each row stopped at EOS or at a stop string
    prompt_lengths: list[int]
    texts: list[str] | None = None  # given `decode`: each row's text, EOS dropped and cut before a stop string
    hypotheses: list[list[Hypothesis]] | None = None  # beam search: every row's num_beams hypotheses, best first


def round_up(n: int, bucket: int) -> int:
    return max(bucket, -(-n // bucket) * bucket)


# ---------------------------------------------------------------------------------------------------
# The decode loop's compiled pieces (the model steps they call are in `owl_jax.inference.steps`).


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
        self.beams = BeamSearch(self, _decode, _cache_axes, jit)

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
        decode: Callable[[list[int]], str] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> GenerationOutput:
        """Generate for a batch of right-padded prompts (the processor's output).

        Args:
          input_ids: `(B, L)` with runs of -1 for images and of -2 for videos, right-padded.
          attention_mask: `(B, L)` 1 on real tokens (default: all).
          pixel_values: `(N, C, H, W)` the batch's images in prompt order (or pass `image_embeds`).
          video_pixel_values: `(M, C, T, H, W)` the batch's videos in prompt order (the video layout).
          stream: called after every step with `(step, tokens (B,), finished (B,))` on the host; with beam
            search, once per token of the best hypotheses after the search (only then are they known).
          decode: ids → text (the processor's `decode`); needed for `config.stop`, and fills `texts`.
          on_progress: called after every chunk of decode steps with the number of tokens picked so far; an
            exception raised from it (or from `stream`) abandons generation.
        """
        cfg = config.validate()
        stop_scanner(cfg.stop, decode)  # refuses stop strings without `decode` before any work
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
        hypotheses = None
        if cfg.num_beams > 1:
            hypotheses = self.beams.run(logits, cache, key_valid, lengths, p, cfg, on_progress, decode=decode)
            generated, finished = self.beams.best(hypotheses, cfg, stream)
        else:
            generated, finished, _, _ = self.decode_loop(
                logits, cache, key_valid, lengths, p, cfg, stream, decode=decode, on_progress=on_progress
            )
        texts = None if decode is None else [_text(t, cfg, decode) for t in generated]
        return GenerationOutput(generated, list(map(bool, finished)), lengths.tolist(), texts, hypotheses)

    def decode_loop(
        self,
        logits: Array,
        cache: KVCache,
        key_valid: Array,
        positions: np.ndarray,
        slot: int,
        cfg: GenerationConfig,
        stream: Callable | None = None,
        *,
        decode: Callable[[list[int]], str] | None = None,
        on_progress: Callable[[int], None] | None = None,
    ):
        """Pick tokens from `logits` and keep feeding them until EOS, a stop string or `max_new_tokens`.

        Args:
          positions: `(B,)` RoPE position of each row's first generated token.
          slot: cache slot of the first generated token.
          decode: ids → text, to find `cfg.stop` strings (checked on the host after every chunk).
          on_progress: called after every chunk with the number of tokens picked so far.

        Returns:
          `(tokens per row, finished (B,), cache, key_valid)`; the cache holds every generated token but
          the last (which was never fed back). A row ended by a stop string ends with the token that
          completed it; the device may have fed a few tokens past it (the host finds it a chunk later),
          so the cache can hold more of that row than its tokens.
        """
        scanner = stop_scanner(cfg.stop, decode)
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
        ends = np.zeros((b,), int)  # how many tokens each finished row kept
        steps, last = 0, time.perf_counter()
        while True:
            with self._ctx():
                carry, picks, ran = self.decode_chunk_fn(
                    self.graphdef, self.state, carry, *fixed, jnp.int32(count), values, structure, self.decode_chunk
                )
            block, n = jax.device_get(pending)
            block = np.asarray(block)[:, : int(n)]
            stop_at = (
                np.full((b,), -1)
                if scanner is None
                else scanner.scan_block(generated[:, :steps], block, finished, cfg.eos_token_id)
            )
            for j, column in enumerate(block.T):
                column = np.where(finished, cfg.pad_token_id, column)  # rows ended by a stop string pad on too
                ending = ~finished & ((column == cfg.eos_token_id) | (stop_at == j))
                finished, ends = finished | ending, np.where(ending, steps + 1, ends)
                generated[:, steps] = column
                if stream is not None:
                    stream(steps, column.copy(), finished.copy())
                steps += 1
            if on_progress is not None:
                on_progress(steps)
            if steps == cfg.max_new_tokens or finished.all():
                break
            if (stop_at >= 0).any():  # the device stops decoding those rows from the next queued chunk on
                with self._ctx():
                    carry = (*carry[:2], carry[2] | jnp.asarray(stop_at >= 0), *carry[3:])
            pending = (picks, ran)
            if stream is not None and n:
                now = time.perf_counter()
                per_step, last = (now - last) / int(n), now
                count = int(min(self.decode_chunk, max(1, self.stream_interval // max(per_step, 1e-6))))
        out = [generated[row, : ends[row] if finished[row] else steps].tolist() for row in range(b)]
        return out, finished, carry[5], carry[6]


def _text(tokens: list[int], cfg: GenerationConfig, decode: Callable[[list[int]], str]) -> str:
    """A row's text: its tokens without EOS, decoded, cut before its first stop string."""
    return cut_at_stop(decode([t for t in tokens if t != cfg.eos_token_id]), cfg.stop)


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
