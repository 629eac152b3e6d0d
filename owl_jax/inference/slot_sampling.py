"""Choosing the next token of every decode slot, each row with its own options, seed and step.

`owl_jax.inference.sampling` picks tokens for a batch that shares one `GenerationConfig`; decode slots
(`owl_jax.inference.slots`) hold unrelated requests, so here every option is a per-row value and the
compiled step depends on one static flag only: whether any row samples. Row by row the choice is the one
`select_tokens` makes for that request alone (same masks, same order of operations, and the same random
key sequence: a row's key is `jax.random.key(seed)` split once per token, as `Generator` splits it), so a
request's tokens do not depend on the other rows.

The raw logits' log-softmax (before any processor or warper) and its top entries come out of the same
compiled step, for the OpenAI `logprobs` fields.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.inference.sampling import _INT32_MAX, NEG_INF, GenerationConfig

Array = jax.Array


class RowValues(NamedTuple):
    """Each row's decoding options, arrays of shape `(B,)` (or scalars for one row)."""

    do_sample: Array  # bool
    temperature: Array  # float32
    top_k: Array  # int32; 0 or less: no top-k
    top_p: Array  # float32; 1 or more: no top-p
    min_new_tokens: Array  # int32
    eos_token_id: Array  # int32


def row_values(config: GenerationConfig) -> RowValues:
    """One request's `RowValues` as numpy scalars (greedy rows ignore the sampling numbers, as
    `GenerationConfig.structure` does)."""
    sample = bool(config.do_sample)
    with np.errstate(over="ignore"):
        return RowValues(
            np.bool_(sample),
            np.float32(config.temperature if sample else 1.0),
            np.int32(min(config.top_k, _INT32_MAX) if sample else 0),
            np.float32(config.top_p if sample else 1.0),
            np.int32(min(config.min_new_tokens, _INT32_MAX)),
            np.int32(config.eos_token_id),
        )


def empty_values(rows: int) -> RowValues:
    """Greedy options for `rows` idle rows."""
    return RowValues(
        jnp.zeros((rows,), bool),
        jnp.ones((rows,), jnp.float32),
        jnp.zeros((rows,), jnp.int32),
        jnp.ones((rows,), jnp.float32),
        jnp.zeros((rows,), jnp.int32),
        jnp.zeros((rows,), jnp.int32),
    )


def warp_rows(logits: Array, values: RowValues) -> Array:
    """`(B, V)` float32 logits after each row's temperature, top-k and top-p (`sampling.warp` row by row:
    a row whose top-k or top-p is off keeps its logits as they are)."""
    logits = logits / values.temperature[:, None]
    use_k, use_p = values.top_k > 0, values.top_p < 1.0
    order = jnp.argsort(-logits, axis=-1)  # stable: tied logits rank in vocabulary order
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.clip(values.top_k, 1, logits.shape[-1])
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    logits = jnp.where(use_k[:, None] & (logits < kth), NEG_INF, logits)
    ranked = jnp.where(use_k[:, None] & (ranked < kth), NEG_INF, ranked)
    probs = jax.nn.softmax(ranked, axis=-1)
    drop_ranked = (jnp.cumsum(probs, axis=-1) - probs >= values.top_p[:, None]) & use_p[:, None]
    drop = jnp.zeros_like(drop_ranked).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_ranked)
    return jnp.where(drop, NEG_INF, logits)


def select_rows(logits: Array, steps: Array, keys: Array, values: RowValues, sample: bool) -> Array:
    """Next tokens `(B,)` from logits `(B, V)`: per row the argmax, or (with `sample`, for rows whose
    `do_sample` is set) a draw with that row's key `keys[b]`, of the processed logits. `steps` `(B,)`
    is each row's token index (EOS is masked while it is below the row's `min_new_tokens`)."""
    logits = logits.astype(jnp.float32)
    eos = jnp.arange(logits.shape[-1])[None, :] == values.eos_token_id[:, None]
    logits = jnp.where((steps < values.min_new_tokens)[:, None] & eos, NEG_INF, logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not sample:
        return greedy
    warped = warp_rows(logits, values)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row[None], axis=-1)[0])(keys, warped)
    return jnp.where(values.do_sample, drawn.astype(jnp.int32), greedy)


def split_keys(keys: Array) -> tuple[Array, Array]:
    """Each row's `key, sub = jax.random.split(key)`: the keys to keep and the ones to draw with, `(B,)` each."""
    pairs = jax.vmap(jax.random.split)(keys)
    return pairs[:, 0], pairs[:, 1]


class Picks(NamedTuple):
    """One step's output for every row: the token, its log-probability and the top alternatives."""

    tokens: Array  # (B,) int32
    logprob: Array  # (B,) float32: log-softmax of the raw logits at the chosen token
    top_ids: Array  # (B, N) int32, most likely first
    top_logprobs: Array  # (B, N) float32


def pick(logits: Array, steps: Array, keys: Array, values: RowValues, sample: bool, top_n: int) -> tuple[Picks, Array]:
    """Advance each row's key, choose its token and read the raw log-probabilities; returns the `Picks`
    and the keys to keep. `logits` `(B, V)`, `steps` `(B,)`, `keys` `(B,)` typed keys."""
    keys, subs = split_keys(keys)
    tokens = select_rows(logits, steps, subs, values, sample)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, top_n)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return Picks(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs), keys
