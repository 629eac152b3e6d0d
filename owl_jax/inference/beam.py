"""Beam search over the generator's KV cache (`GenerationConfig.num_beams` > 1).

The released model's `generate(num_beams=...)`, token for token; the scorer, and where it follows or leaves
transformers 4.28, is in `owl_jax.inference.beam_scorer`. Each prompt's cache row is copied to `num_beams`
rows (prompt b's beams are rows `b * K ... b * K + K - 1`) and, after every step, the rows are gathered by
the beams the new ones continue (`jnp.take` on the cache's batch axis), so every row holds its own beam's
keys and values. Decoding runs as the greedy path does: chunks of up to `decode_chunk` steps, each one
on-device loop of model step and scorer, the next chunk queued before the host reads whether the last one
ended the search. The compiled pieces depend on the shapes (prompt and cache buckets, batch, num_beams) and
on the structure of the options (`DecodeStructure`, `early_stopping`); `length_penalty`, `min_new_tokens`
and `max_new_tokens` are traced values.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.inference.beam_scorer import (
    Beams,
    BeamStructure,
    BeamValues,
    Hypotheses,
    choose,
    finish,
    ranked,
    start,
)
from owl_jax.inference.sampling import DecodeStructure, DecodeValues, GenerationConfig
from owl_jax.inference.stops import stop_scanner
from owl_jax.modeling.llama import KVCache

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One of a prompt's final hypotheses."""

    tokens: list[int]  # the generated ids, ending with EOS when the hypothesis finished there
    score: float  # summed log-probabilities / length ** length_penalty (transformers' beam score)
    finished: bool  # whether it ended at EOS


def reorder_cache(cache: KVCache, rows: Array) -> KVCache:
    """The cache with its batch rows gathered by `rows` `(R',)` (either layout of `KVCache`)."""
    if cache.per_layer:
        take = lambda a: jnp.take(a, rows, axis=0, mode="clip")  # noqa: E731
        return KVCache(tuple(take(a) for a in cache.k), tuple(take(a) for a in cache.v))
    return KVCache(jnp.take(cache.k, rows, axis=1, mode="clip"), jnp.take(cache.v, rows, axis=1, mode="clip"))


def read_hypotheses(hyps: Hypotheses, eos_token_id: int) -> list[list[Hypothesis]]:
    """Each prompt's hypotheses, best first, read to the host (EOS appended to those that finished there)."""
    hyps = jax.device_get(hyps)
    out = []
    for row, slots in enumerate(ranked(hyps)):
        row_hyps = []
        for j in slots:
            tokens = hyps.tokens[row, j, 1 : int(hyps.lengths[row, j])].tolist()
            finished = bool(hyps.eos[row, j])
            row_hyps.append(Hypothesis(tokens + [eos_token_id] * finished, float(hyps.scores[row, j]), finished))
        out.append(row_hyps)
    return out


def _begin(
    cache_axes: Callable,
    logits: Array,
    cache: KVCache,
    key_valid: Array,
    width: int,
    structure: DecodeStructure,
    values: DecodeValues,
    settings: BeamStructure,
    beam_values: BeamValues,
    bos_token_id: int,
):
    """Copy each prompt's row `num_beams` times and make the first pick from the prompts' logits `(B, V)`.

    Every copy holds the same cache, so the first pick needs no gather. Returns `(beams, cache, key_valid)`.
    """
    b = logits.shape[0]
    rows = jnp.repeat(jnp.arange(b), settings.num_beams)
    beams = start(b, settings, width, bos_token_id, structure.pad_token_id)
    beams, _ = choose(jnp.take(logits, rows, axis=0), beams, structure, values, settings, beam_values)
    return beams, cache_axes(reorder_cache(cache, rows)), jnp.take(key_valid, rows, axis=0)


def _chunk(
    decode: Callable,
    cache_axes: Callable,
    graphdef,
    params,
    carry: tuple[Beams, KVCache, Array],
    positions: Array,
    slot: Array,
    limit: Array,
    count: Array,
    values: DecodeValues,
    beam_values: BeamValues,
    structure: DecodeStructure,
    settings: BeamStructure,
):
    """Up to `count` search steps in one on-device loop: feed each beam's latest pick (step s at cache slot
    `slot + s`, RoPE position `positions + s`), pick the next tokens, gather the cache rows. Stops early
    once every prompt is done or pick `limit - 1` was made. Returns the new carry and how many steps ran."""

    def cond(state):
        i, (beams, _, _) = state
        return (i < count) & (beams.step + 1 < limit) & ~jnp.all(beams.done)

    def body(state):
        i, (beams, cache, key_valid) = state
        logits, cache, key_valid = decode(
            graphdef, params, cache, beams.tokens, positions + beams.step, slot + beams.step, key_valid
        )
        beams, rows = choose(logits, beams, structure, values, settings, beam_values)
        cache = cache_axes(reorder_cache(cache, rows))
        return i + 1, (beams, cache, jnp.take(key_valid, rows, axis=0))

    ran, carry = jax.lax.while_loop(cond, body, (jnp.int32(0), carry))
    return carry, ran


class BeamSearch:
    """Beam search for one `Generator`; its compiled pieces are kept and reused across calls.

    Args:
      generator: the generator (its model state, mesh, buckets and `decode_chunk`).
      decode: the generator's one-token step `(graphdef, params, cache, tokens, positions, slot, key_valid)`
        → `(logits, cache, key_valid)`.
      cache_axes: constrains a cache to the mesh's layout.
      jit: `jax.jit` with the generator's compiler options.
    """

    def __init__(self, generator: Any, decode: Callable, cache_axes: Callable, jit: Callable):
        self.generator = generator
        self.begin = jit(functools.partial(_begin, cache_axes), static_argnums=(3, 4, 6, 8))
        self.chunk = jit(functools.partial(_chunk, decode, cache_axes), static_argnums=(0, 9, 10), donate_argnums=(2,))
        self.end = jit(finish, static_argnums=(1,))

    def run(
        self,
        logits: Array,
        cache: KVCache,
        key_valid: Array,
        positions: np.ndarray,
        slot: int,
        cfg: GenerationConfig,
        on_progress: Callable[[int], None] | None = None,
        *,
        decode: Callable[[list[int]], str] | None = None,
    ) -> list[list[Hypothesis]]:
        """Search from the prompts' logits `(B, V)` over their cache (left as it is: the beams decode on copies).

        Args:
          positions: `(B,)` RoPE position of each prompt's first generated token.
          slot: cache slot of the first generated token.
          on_progress: called after every chunk of steps with the number of picks made so far; an exception
            raised from it abandons the search.
          decode: ids → text, for `cfg.stop`: the search runs as the released one does, then each hypothesis
            ends at the token that completes the first stop string in its text (and counts as finished).

        Returns:
          Per prompt, its `num_beams` hypotheses, best first.
        """
        scanner = stop_scanner(cfg.stop, decode)
        gen, k = self.generator, cfg.num_beams
        structure, settings = cfg.structure(), BeamStructure(k, cfg.early_stopping)
        width = -(-(cfg.max_new_tokens + 1) // gen.cache_bucket) * gen.cache_bucket
        with gen._ctx():
            values = jax.tree.map(jnp.asarray, cfg.values())
            beam_values = BeamValues(jnp.float32(cfg.length_penalty), jnp.int32(cfg.max_new_tokens + 1))
            carry = self.begin(
                logits, cache, key_valid, width, structure, values, settings, beam_values, cfg.bos_token_id
            )
            fixed = (jnp.asarray(np.repeat(positions, k), jnp.int32), jnp.int32(slot), jnp.int32(cfg.max_new_tokens))
            count = jnp.int32(gen.decode_chunk)
        picks, pending = 1, None
        while True:  # the device runs one chunk ahead of the host, as in `Generator.decode_loop`
            with gen._ctx():
                carry, ran = self.chunk(
                    gen.graphdef, gen.state, carry, *fixed, count, values, beam_values, structure, settings
                )
            if pending is not None:
                n = int(jax.device_get(pending))
                picks += n
                if on_progress is not None:
                    on_progress(picks)
                if n < gen.decode_chunk or picks >= cfg.max_new_tokens:
                    break
            pending = ran
        with gen._ctx():
            out = read_hypotheses(self.end(carry[0], settings, beam_values), cfg.eos_token_id)
        if scanner is not None:
            for hyps in out:
                for i, h in enumerate(hyps):
                    body = h.tokens[:-1] if h.finished else h.tokens
                    n = scanner.first_stop(body, len(body))
                    if n is not None:
                        hyps[i] = Hypothesis(body[:n], h.score, True)
        return out

    @staticmethod
    def best(
        hypotheses: list[list[Hypothesis]], cfg: GenerationConfig, stream: Callable | None = None
    ) -> tuple[list[list[int]], list[bool]]:
        """Each prompt's best hypothesis: `(tokens per prompt, finished per prompt)`. `stream`, if given, gets
        them as decoding would have: `(step, tokens (B,), finished (B,))` per step, padding after a row's end."""
        tokens = [hyps[0].tokens for hyps in hypotheses]
        finished = [hyps[0].finished for hyps in hypotheses]
        if stream is not None:
            ended = np.zeros(len(tokens), bool)
            for step in range(max(map(len, tokens))):
                column = np.array([t[step] if step < len(t) else cfg.pad_token_id for t in tokens], np.int32)
                ended |= np.array([f and step == len(t) - 1 for t, f in zip(tokens, finished)])
                stream(step, column, ended.copy())
        return tokens, finished
