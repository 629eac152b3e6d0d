"""Decode slots: a fixed number of rows over one preallocated KV cache, each row serving its own request.

Continuous batching needs requests to join and leave a running batch. `Generator` cannot do that: its rows
are left-padded to one length and advance one shared cache column per step from the prompt's end. Here the
cache has S columns and a fixed number of rows B, and every decode step writes all rows at one shared
column `write` that goes round the cache as a ring (`(write + 1) % S`). A row keeps its own RoPE position,
token index, options and key mask: its request occupies the S-long ring window that ends at `write`, so a
request of n prompt tokens and at most S - n new tokens never overwrites its own keys, and the columns it
leaves behind belong to no one else (each row has its own cache row).

Admitting a request into a free row (`admit`) runs the prompt (left-padded to a bucket P, with its images)
through `_prefill` into a fresh one-row cache, rolls that row so the prompt ends just before `write`,
and writes it over the row's cache and key mask; the same compiled call picks the request's first token.
Attention does not care in which columns the keys sit (RoPE is applied before they are cached, and the mask
says which are the row's), so a row computes what `Generator.generate` computes for the request alone, up
to the order in which the softmax sums its terms. One `step` then feeds every row's last pick and picks the
next for all rows at once (`owl_jax.inference.slot_sampling`: per-row options and seeds, plus the raw
log-probabilities); idle rows are computed too and ignored by the caller. `step(sample, count)` runs
`count` such steps in one program (a scan), so the host dispatches and reads once per `count` tokens.

The cache is one `(B, Hkv, S, Dh)` buffer per layer (`KVCache.per_layer`), updated in place by an
unrolled loop over the layers: a stacked cache would be rewritten whole by every step (`lax.scan` restacks
it), so a step would cost in proportion to the cache rather than to the tokens it adds. A generator built
with `unstack_layers=True` hands its per-layer weights over as they are; otherwise each step slices the
layers out of the stacked weights (on a GPU that slice is a copy: build the generator with
`unstack_layers=True` there).

The ring's length S is itself one of a few buckets (`ring_lengths`, at most the model's context): the
shortest that holds the longest live request's keys plus the next step's. A step reads all S columns of
every row, so a ring sized for the longest possible request would make a batch of short requests pay for
it; instead the ring grows when a request joins or grows past it and shrinks when the long ones leave, by
one copy that keeps the most recent columns (`_resize`).

Compiled programs: one `admit` per prompt bucket and ring length, two `step`s (with and without sampling
rows) per ring length and step count, one `_resize` per pair of ring lengths met, and one image (and
video) encoder: a request's images are encoded one at a time into a fixed buffer of
`context // tokens_per_image` embeddings that `admit` reads, so neither the image count nor the prompt
length inside a bucket compiles anything new. Decoders of one model share their programs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax import ops
from owl_jax.inference.generate import Generator
from owl_jax.inference.sampling import GenerationConfig
from owl_jax.inference.slot_sampling import Picks, RowValues, empty_values, pick, row_values
from owl_jax.inference.steps import _decode, _merge, _prefill
from owl_jax.modeling.llama import KVCache
from owl_jax.modeling.owl import check_media_placeholders

Array = jax.Array


class SlotState(NamedTuple):
    """Everything a decode step reads and writes, on the device."""

    cache: KVCache  # B rows of S columns
    key_valid: Array  # (B, S) bool: the columns each row attends to
    tokens: Array  # (B,) int32: each row's last pick, not yet fed
    positions: Array  # (B,) int32: RoPE position of `tokens`
    steps: Array  # (B,) int32: index of `tokens` among the row's generated tokens
    keys: Array  # (B,) typed random keys, each split once per token
    values: RowValues  # (B,) each row's options
    write: Array  # () int32: the column the next step writes, shared by all rows


def _roll_into(big: Array, small: Array, row: Array, shift: Array) -> Array:
    """One layer's `(B, Hkv, S, Dh)` buffer with its row `row` replaced by the one-row `small` rolled by
    `shift` columns."""
    rolled = jnp.roll(small, shift, axis=2).astype(big.dtype)
    return jax.lax.dynamic_update_slice_in_dim(big, rolled, row, axis=0)


def _per_layer(params):
    """`Generator.state` with the LLM's weights as one state per layer (sliced out of the stacked ones when
    the generator keeps them stacked), so the steps run an unrolled loop over a per-layer cache: with the
    stacked cache a decode step rewrites the whole cache (`lax.scan` restacks it)."""
    state, layer_states, fused = params
    if layer_states is not None:
        return params
    stacked = state["language_model"]["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    return state, [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)], None


def _admit(graphdef, params, state: SlotState, images, videos, row, ids, mask, values, key, top_n: int):
    """Prefill one left-padded prompt `ids` `(1, P)` (`mask` 1 on its real tokens) into row `row` so that
    it ends at column `write - 1`, and pick its first token. `images`/`videos` `(M, T, D)` hold its media
    in prompt order (spare entries unused) or are None. Returns the new state and the row's `Picks` `(1,)`."""
    s = state.key_valid.shape[1]
    p = ids.shape[1]
    logits, small, valid = _prefill(graphdef, _per_layer(params), ids, mask, images, p, videos)
    small = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, s - p), (0, 0))), small)
    valid = jnp.pad(valid, ((0, 0), (0, s - p)))
    shift = (state.write - p) % s
    cache = jax.tree.map(lambda big, one: _roll_into(big, one, row, shift), state.cache, small)
    key_valid = jax.lax.dynamic_update_slice_in_dim(state.key_valid, jnp.roll(valid, shift, axis=1), row, axis=0)
    one = jax.tree.map(lambda v: jnp.asarray(v)[None], values)
    picks, keys = pick(logits, jnp.zeros((1,), jnp.int32), key[None], one, True, top_n)
    put = lambda array, value: jax.lax.dynamic_update_slice_in_dim(array, value.astype(array.dtype), row, axis=0)
    state = state._replace(
        cache=cache,
        key_valid=key_valid,
        tokens=put(state.tokens, picks.tokens),
        positions=put(state.positions, jnp.sum(mask, axis=1)),
        steps=put(state.steps, jnp.zeros((1,), jnp.int32)),
        keys=put(state.keys, keys),
        values=jax.tree.map(put, state.values, one),
    )
    return state, picks


def _step(graphdef, params, state: SlotState, sample: bool, top_n: int):
    """Feed every row's last pick at column `write` and pick the next: the new state and `Picks` `(B,)`."""
    logits, cache, key_valid = _decode(
        graphdef, _per_layer(params), state.cache, state.tokens, state.positions, state.write, state.key_valid
    )
    steps = state.steps + 1
    picks, keys = pick(logits, steps, state.keys, state.values, sample, top_n)
    state = SlotState(
        cache,
        key_valid,
        picks.tokens,
        state.positions + 1,
        steps,
        keys,
        state.values,
        (state.write + 1) % key_valid.shape[1],
    )
    return state, picks


def _steps(graphdef, params, state: SlotState, sample: bool, top_n: int, count: int):
    """`count` decode steps in one program: the state after them and their `Picks` `(count, B)`."""
    return jax.lax.scan(lambda carry, _: _step(graphdef, params, carry, sample, top_n), state, None, length=count)


def _encode_into(graphdef, params, buffer, index, pixel_values, video: bool):
    """`buffer` `(M, T, D)` with entry `index` set to the embedding of one image `(1, C, H, W)` (or one
    video `(1, C, T, H, W)`)."""
    model = _merge(graphdef, params)[0]
    embeds = model.encode_videos(pixel_values) if video else model.encode_images(pixel_values)
    return jax.lax.dynamic_update_slice_in_dim(buffer, embeds.astype(buffer.dtype), index, axis=0)


def _resize(state: SlotState, length: int) -> SlotState:
    """`state` over a ring of `length` columns: the last `min(S, length)` columns written (every live row's
    keys, when they fit) moved to the end of the new ring, oldest first, and the next write at column 0."""
    s = state.key_valid.shape[1]
    keep = min(s, length)

    def move(a: Array, axis: int) -> Array:
        recent = jax.lax.slice_in_dim(jnp.roll(a, -state.write, axis=axis), s - keep, s, axis=axis)
        pad = [(0, 0)] * a.ndim
        pad[axis] = (length - keep, 0)
        return jnp.pad(recent, pad)

    cache = jax.tree.map(lambda a: move(a, 2), state.cache)
    return state._replace(cache=cache, key_valid=move(state.key_valid, 1), write=jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _zeros(text: Any, rows: int, length: int, dtype: str) -> SlotState:
    """The state of `rows` idle rows over a ring of `length` columns."""
    return SlotState(
        KVCache.zeros(text, rows, length, dtype, per_layer=True),
        jnp.zeros((rows, length), bool),
        jnp.zeros((rows,), jnp.int32),
        jnp.zeros((rows,), jnp.int32),
        jnp.zeros((rows,), jnp.int32),
        jax.random.split(jax.random.key(0), rows),
        empty_values(rows),
        jnp.zeros((), jnp.int32),
    )


@functools.lru_cache(maxsize=1024)
def _seed_key(seed: int) -> Array:
    """`jax.random.key(seed)`, made once per seed: made eagerly it costs more host time than a whole
    admission's dispatch, and requests mostly share a few seeds."""
    return jax.random.key(seed)


@functools.cache
def _programs(graphdef, treedef, options: tuple[tuple[str, Any], ...]) -> tuple[Callable, ...]:
    """The jitted admit, step, encoder and ring resize of one model (its graph, and the structure of `Generator.state`
    flattened) under these compiler options, shared by every `SlotDecoder` of that model.

    They take the model state as its list of leaves: a call then neither hashes the graph (a static
    argument is hashed at every call) nor flattens the state's nested dictionaries, host work that would
    cost more than a small model's whole decode step.
    """
    jit = functools.partial(jax.jit, compiler_options=dict(options) or None)
    params = lambda leaves: jax.tree.unflatten(treedef, leaves)
    return (
        jit(lambda leaves, *a: _admit(graphdef, params(leaves), *a), static_argnums=(9,), donate_argnums=(1,)),
        jit(lambda leaves, *a: _steps(graphdef, params(leaves), *a), static_argnums=(2, 3, 4), donate_argnums=(1,)),
        jit(lambda leaves, *a: _encode_into(graphdef, params(leaves), *a), static_argnums=(4,), donate_argnums=(1,)),
        jit(_resize, static_argnums=(1,)),
    )


def default_buckets(smallest: int, length: int) -> tuple[int, ...]:
    """Prompt buckets `smallest, 2·smallest, 4·smallest, ...` up to `length`, and `length` itself."""
    buckets, size = [], max(1, int(smallest))
    while size < length:
        buckets.append(size)
        size *= 2
    return (*buckets, int(length))


class SlotDecoder:
    """`rows` decode slots over one KV cache of `length` columns, for one `Generator`'s model.

    Args:
      generator: the model's `Generator` (its model state, mesh and image encoder are shared).
      rows: how many requests decode at once.
      length: cache columns (S): a request needs prompt + max_new_tokens <= S (default: the model's
        `max_position_embeddings`).
      prompt_buckets: prompt lengths are padded up to the first of these that holds them (one compiled
        admit each; default: `generator.prompt_bucket` doubling up to S).
      ring_lengths: the cache lengths the ring takes (default: S/8 or the smallest prompt bucket, doubling
        up to S; S is always one). The ring is the shortest of them that holds every live row's keys and
        the next step's, so a step reads as many columns as the longest request needs, not S: it grows as
        requests grow or join and shrinks when long ones leave (`_resize` keeps the most recent columns).
      top_logprobs: how many alternatives each step reports (`Picks.top_ids`), at most the vocabulary.

    Only one thread may call it. Rows are chosen by the caller (`owl_jax.inference.slot_batch`).
    """

    def __init__(
        self,
        generator: Generator,
        rows: int,
        *,
        length: int | None = None,
        prompt_buckets: Sequence[int] | None = None,
        ring_lengths: Sequence[int] | None = None,
        top_logprobs: int = 20,
    ):
        cfg = generator.model.config
        self.generator, self.rows = generator, int(rows)
        self.length = int(length or cfg.text.max_position_embeddings)
        self.buckets = tuple(sorted(set(prompt_buckets or default_buckets(generator.prompt_bucket, self.length))))
        if self.rows < 1 or not self.buckets or self.buckets[0] < 1 or self.buckets[-1] > self.length:
            raise ValueError(
                f"need rows >= 1 and prompt buckets within 1..length; got rows={rows}, length={self.length}, "
                f"prompt_buckets={self.buckets}"
            )
        rings = ring_lengths or default_buckets(max(self.buckets[0], self.length // 8), self.length)
        self.rings = tuple(sorted({*rings, self.length}))
        if self.rings[0] < 1 or self.rings[-1] > self.length:
            raise ValueError(f"ring lengths must be within 1..length={self.length}; got {ring_lengths}")
        self.top_n = max(1, min(int(top_logprobs), cfg.text.vocab_size))
        self.media_tokens = int(cfg.image_tokens)
        self.takes_videos = bool(getattr(cfg, "video", None))
        options = tuple(sorted((ops.compiler_options(cfg.numerics) or {}).items()))
        self._params, treedef = jax.tree.flatten(generator.state)
        self._admit, self._step, self._encode, self._resize = _programs(generator.graphdef, treedef, options)
        self.live = np.zeros(self.rows, bool)  # rows holding a request (`admit` to `release`)
        self.filled = np.zeros(self.rows, np.int64)  # each live row's keys in the cache: prompt + steps
        self.state = self._empty_state(self.rings[0])
        self.images = self._media_buffer(video=False)
        self.videos = self._media_buffer(video=True) if self.takes_videos else None

    # --------------------------------------------------------------------------------------- set-up
    def _empty_state(self, length: int) -> SlotState:
        cfg = self.generator.model.config
        with self.generator._ctx():  # made by a program, so placed as the steps' outputs are
            return _zeros(cfg.text, self.rows, length, cfg.dtype)

    def _media_buffer(self, video: bool) -> Array:
        """Zeros `(S // tokens_per_medium, T, D)` in the encoder's output dtype."""
        cfg = self.generator.model.config
        v = cfg.vision
        shape = (
            (1, v.num_channels, 2, v.image_size, v.image_size)
            if video
            else (1, v.num_channels, v.image_size, v.image_size)
        )
        model_state = self.generator.state
        encode = lambda params, px: _merge(self.generator.graphdef, params)[0].encode_images(px)
        out = jax.eval_shape(encode, model_state, jax.ShapeDtypeStruct(shape, jnp.float32))
        with self.generator._ctx():
            return jnp.zeros((max(1, self.length // self.media_tokens), *out.shape[1:]), out.dtype)

    def reset(self) -> None:
        """Forget every row (after a failed step, whose donated state is gone)."""
        self.live[:] = False
        self.state = self._empty_state(self.rings[0])

    @property
    def ring(self) -> int:
        """The ring's length now (cache columns a step reads)."""
        return int(self.state.key_valid.shape[1])

    def _fit(self, need: int) -> None:
        """Make the ring the shortest of `rings` that holds `need` columns (the longest when none does)."""
        target = next((r for r in self.rings if r >= need), self.rings[-1])
        if target == self.ring:
            return
        with self.generator._ctx():
            if self.live.any():
                self.state = self._resize(self.state, target)
            else:  # nothing to keep
                self.state = self._empty_state(target)

    # ------------------------------------------------------------------------------------ requests
    def bucket(self, n: int) -> int | None:
        """The prompt bucket holding `n` tokens (None when none does)."""
        return next((b for b in self.buckets if b >= n), None)

    def refuses(self, prompt_tokens: int, config: GenerationConfig, videos: int = 0) -> str | None:
        """Why a request cannot decode in a slot (None when it can): beam search, n-gram bans, videos on an
        image model, or a prompt + answer longer than the cache."""
        if config.num_beams > 1:
            return f"beam search (num_beams={config.num_beams})"
        if config.no_repeat_ngram_size > 0:
            return "no_repeat_ngram_size"
        if videos and not self.takes_videos:
            return "videos on a model without a video layout"
        if prompt_tokens + config.max_new_tokens > self.length or self.bucket(prompt_tokens) is None:
            return (
                f"{prompt_tokens} prompt tokens + max_new_tokens {config.max_new_tokens} exceed the "
                f"{self.length} cache columns of a slot"
            )
        return None

    def admit(
        self,
        row: int,
        input_ids: np.ndarray,
        pixel_values: np.ndarray | None,
        config: GenerationConfig,
        video_pixel_values: np.ndarray | None = None,
    ) -> Picks:
        """Start a request in row `row` (any request that was there is dropped) and pick its first token.

        Args:
          input_ids: `(L,)` the prompt, with runs of -1 (images) and -2 (videos).
          pixel_values: `(N, C, H, W)` its images in prompt order (or None).
          video_pixel_values: `(V, C, T, H, W)` its videos in prompt order (or None).

        Returns the row's `Picks` `(1,)` (device arrays). ValueError for a prompt the slots cannot take.
        """
        ids = np.asarray(input_ids, np.int32).reshape(-1)
        n_images = 0 if pixel_values is None else len(pixel_values)
        n_videos = 0 if video_pixel_values is None else len(video_pixel_values)
        reason = self.refuses(len(ids), config.validate(), n_videos)
        if reason is not None or not len(ids):
            raise ValueError(f"a slot cannot take this request: {reason or 'an empty prompt'}")
        check_media_placeholders(ids[None], self.media_tokens, num_images=n_images, num_videos=n_videos)
        p = self.bucket(len(ids))
        self.live[row] = False
        self._fit(max(p, int(self.filled[self.live].max(initial=0)) + 1))
        padded, mask = np.full((1, p), config.pad_token_id, np.int32), np.zeros((1, p), np.int32)
        padded[0, p - len(ids) :], mask[0, p - len(ids) :] = ids, 1
        gen = self.generator
        with gen._ctx():
            for i in range(n_images):
                px = np.asarray(pixel_values[i : i + 1])
                self.images = self._encode(self._params, self.images, i, px, False)
            for i in range(n_videos):
                px = np.asarray(video_pixel_values[i : i + 1])
                self.videos = self._encode(self._params, self.videos, i, px, True)
            key = _seed_key(config.seed)
            self.state, picks = self._admit(
                self._params,
                self.state,
                self.images,
                self.videos,
                np.int32(row),
                padded,
                mask,
                row_values(config),
                key,
                self.top_n,
            )
        self.live[row], self.filled[row] = True, len(ids)
        return picks

    def release(self, row: int) -> None:
        """Row `row` holds no request any more: the ring no longer keeps room for its keys."""
        self.live[row] = False

    def step(self, sample: bool, count: int = 1) -> Picks:
        """`count` decode steps for every row in one call (`sample`: whether any row samples); returns
        their `Picks` `(count, B)`.

        A row may compute past its request's end (its caller drops those tokens): a request of n prompt
        tokens keeps at most S - n of them, all computed before any column of its own is overwritten.
        """
        count = int(count)
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if self.live.any():
            self._fit(int(self.filled[self.live].max()) + count)
        gen = self.generator
        with gen._ctx():
            self.state, picks = self._step(self._params, self.state, bool(sample), self.top_n, count)
        self.filled[self.live] += count
        return picks

    def compiled(self) -> dict[str, int]:
        """How many programs each compiled function holds (shared by the decoders with the same compiler
        options; a steady stream of requests adds none)."""
        return {name: getattr(self, f"_{name}")._cache_size() for name in ("admit", "step", "encode", "resize")}
