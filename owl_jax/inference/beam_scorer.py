"""The beam-search scorer of the released model's `generate(num_beams=...)`, traced on the device.

The released `generate` is HF transformers 4.28's `beam_search` with its `BeamSearchScorer`; this module
follows it step for step, vectorized over the prompts of a batch (`B` prompts, `K` beams each, `R = B * K`
rows; prompt b's beams are rows `b * K ... b * K + K - 1`):

- A prompt starts with K copies of its prompt; beam 0 scores 0 and the others -1e9, so the first step
  expands beam 0 alone.
- Each step takes the log-softmax of every beam's logits, applies the logits processors to it
  (`min_new_tokens` masks EOS, the n-gram ban; `owl_jax.inference.sampling.process_logits`), adds the
  beam's score and keeps the 2K best continuations over beams × vocabulary, best first.
- Going through them in order until K beams are chosen: an EOS continuation ranked among the first K
  finishes a hypothesis (one ranked lower is skipped), any other becomes a beam of the next step.
- A hypothesis scores its summed log-probabilities / length ** `length_penalty`, where the length is that of
  the ids transformers tracks: BOS and the tokens before EOS (the released model feeds the prompt as
  embeddings, so the prompt's ids are not among them). A prompt keeps its K best hypotheses: a new one
  enters while there are fewer than K or when it beats the worst, which then leaves (among equal scores,
  the one added first).
- A prompt is done once it has K hypotheses and, with `early_stopping` True, at once; with False, when the
  best continuation's score divided by the next length ** `length_penalty` cannot beat the worst
  hypothesis; with "never", the same with the longest possible length (BOS + max_new_tokens) when
  `length_penalty` > 0. A done prompt's beams continue as padding.
- When every prompt is done or max_new_tokens are reached, the open beams of the prompts not done are
  added as hypotheses (length BOS + every token) and the best hypothesis wins; among equal scores, the one
  added last.

One difference, on purpose: transformers 4.28 lengthens the length its stopping test uses by one for each
unfinished prompt before it in the batch (`cur_len += 1` inside its loop over prompts), so a prompt's beams
can depend on its batch mates. Here every prompt uses the length it has when it is alone, so each prompt of
a batch gets what the released `generate` gives it alone. Scores are float32 (transformers divides in
float64), so only hypotheses whose scores round to the same float32 could rank differently.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.inference.sampling import DecodeStructure, DecodeValues, process_logits

Array = jax.Array
START_GAP = -1e9  # the initial score of every beam but the first
_NO_HYPOTHESIS = 1e9  # transformers' worst score while a prompt has no hypothesis


@dataclasses.dataclass(frozen=True)
class BeamStructure:
    """What shapes the compiled search: a static argument."""

    num_beams: int
    early_stopping: bool | str = False  # True, False or "never"


class BeamValues(NamedTuple):
    """Traced numbers of the search."""

    length_penalty: Array  # () float32
    max_length: Array  # () int32: transformers' max_length, BOS + max_new_tokens


class Hypotheses(NamedTuple):
    """Each prompt's finished hypotheses, K slots each."""

    scores: Array  # (B, K) float32: summed log-probabilities / length ** length_penalty; -inf when empty
    tokens: Array  # (B, K, H) int32: the history row each was taken from (BOS, then its tokens)
    lengths: Array  # (B, K) int32: BOS and the tokens before EOS
    eos: Array  # (B, K) bool: finished at EOS (else an open beam added at the end)
    order: Array  # (B, K) int32: when each was added; -1 when empty
    count: Array  # (B,) int32
    worst: Array  # (B,) float32: the lowest kept score (1e9 while there is none)
    added: Array  # (B,) int32: how many were ever added


class Beams(NamedTuple):
    """The search's state between steps."""

    step: Array  # () int32: the index of the latest pick (-1 before the first)
    tokens: Array  # (R,) int32: each beam's latest pick, not yet fed to the model
    scores: Array  # (R,) float32: each beam's summed log-probabilities
    history: Array  # (R, H) int32: BOS, then each beam's picks
    done: Array  # (B,) bool
    hyps: Hypotheses


def start(batch: int, settings: BeamStructure, width: int, bos_token_id: int, pad_token_id: int) -> Beams:
    """The state before the first pick: `batch` prompts of `settings.num_beams` beams, histories `width` long."""
    k = settings.num_beams
    rows = batch * k
    history = jnp.zeros((rows, width), jnp.int32).at[:, 0].set(bos_token_id)
    scores = jnp.tile(jnp.asarray([0.0] + [START_GAP] * (k - 1), jnp.float32), batch)
    hyps = Hypotheses(
        scores=jnp.full((batch, k), -jnp.inf, jnp.float32),
        tokens=jnp.zeros((batch, k, width), jnp.int32),
        lengths=jnp.zeros((batch, k), jnp.int32),
        eos=jnp.zeros((batch, k), bool),
        order=jnp.full((batch, k), -1, jnp.int32),
        count=jnp.zeros((batch,), jnp.int32),
        worst=jnp.full((batch,), _NO_HYPOTHESIS, jnp.float32),
        added=jnp.zeros((batch,), jnp.int32),
    )
    return Beams(
        jnp.int32(-1), jnp.full((rows,), pad_token_id, jnp.int32), scores, history, jnp.zeros(batch, bool), hyps
    )


def add_hypotheses(h: Hypotheses, mask: Array, score: Array, rows: Array, length: Array, eos: bool) -> Hypotheses:
    """Offer one hypothesis per prompt where `mask` `(B,)` is set: `score` `(B,)`, taken from history `rows`
    `(B, H)`, `length` long. It enters while the prompt has fewer than K, or when it beats the worst, which
    it replaces (the earliest added among the lowest)."""
    k = h.scores.shape[1]
    full = h.count >= k
    accept = mask & (~full | (score > h.worst))
    lowest = jnp.min(h.scores, axis=1, keepdims=True)
    earliest = jnp.argmin(jnp.where(h.scores == lowest, h.order, jnp.iinfo(jnp.int32).max), axis=1)
    slot = jnp.where(full, earliest, h.count)
    write = accept[:, None] & (jnp.arange(k)[None, :] == slot[:, None])  # (B, K)
    scores = jnp.where(write, score[:, None], h.scores)
    kept_worst = jnp.where(full, jnp.min(scores, axis=1), jnp.minimum(score, h.worst))
    return Hypotheses(
        scores=scores,
        tokens=jnp.where(write[:, :, None], rows[:, None, :], h.tokens),
        lengths=jnp.where(write, length, h.lengths),
        eos=jnp.where(write, eos, h.eos),
        order=jnp.where(write, h.added[:, None], h.order),
        count=jnp.minimum(h.count + accept, k),
        worst=jnp.where(accept, kept_worst, h.worst),
        added=h.added + accept,
    )


def choose(
    logits: Array,
    beams: Beams,
    structure: DecodeStructure,
    values: DecodeValues,
    settings: BeamStructure,
    beam_values: BeamValues,
) -> tuple[Beams, Array]:
    """Pick every beam's next token from `logits` `(R, V)` (the beams' last picks fed): the new state and, for
    each new beam, the row `(R,)` it continues (gather the cache rows by it)."""
    rows, vocab = logits.shape
    k = settings.num_beams
    b = rows // k
    t = beams.step + 1  # the pick's index: every beam holds BOS and t tokens
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    history_len = jnp.full((rows,), t + 1, jnp.int32)
    processed = process_logits(logprobs, t, beams.history, history_len, structure, values)
    totals = (processed + beams.scores[:, None]).reshape(b, k * vocab)
    top, flat = jax.lax.top_k(totals, 2 * k)  # (B, 2K), best first
    source, token = flat // vocab, (flat % vocab).astype(jnp.int32)

    penalty = beam_values.length_penalty
    length = t + 1  # transformers' length of a hypothesis ending here: BOS and t tokens
    first_row = jnp.arange(b) * k
    open_ = ~beams.done
    hyps, filled = beams.hyps, jnp.zeros((b,), jnp.int32)
    next_scores = jnp.zeros((b, k), jnp.float32)
    next_tokens = jnp.full((b, k), structure.pad_token_id, jnp.int32)
    next_source = jnp.zeros((b, k), jnp.int32)
    for rank in range(2 * k):  # transformers' loop over the candidates, for every prompt at once
        score, tok, src = top[:, rank], token[:, rank], source[:, rank]
        room = open_ & (filled < k)
        is_eos = tok == structure.eos_token_id
        if rank < k:  # an EOS ranked below the first K finishes nothing
            taken = jnp.take(beams.history, first_row + src, axis=0)
            normalized = score / jnp.power(length.astype(jnp.float32), penalty)
            hyps = add_hypotheses(hyps, room & is_eos, normalized, taken, length, eos=True)
        keep = room & ~is_eos
        slot = keep[:, None] & (jnp.arange(k)[None, :] == filled[:, None])
        next_scores = jnp.where(slot, score[:, None], next_scores)
        next_tokens = jnp.where(slot, tok[:, None], next_tokens)
        next_source = jnp.where(slot, src[:, None], next_source)
        filled = filled + keep

    next_length = (length + 1).astype(jnp.float32)  # the length alone; see the module docstring
    if settings.early_stopping is True:
        bound = None
    elif settings.early_stopping is False:
        bound = top[:, 0] / jnp.power(next_length, penalty)
    else:  # "never"
        longest = beam_values.max_length.astype(jnp.float32)
        bound = top[:, 0] / jnp.power(jnp.where(penalty > 0, longest, next_length), penalty)
    enough = hyps.count >= k
    done = beams.done | (enough if bound is None else enough & (hyps.worst >= bound))

    src_rows = (first_row[:, None] + next_source).reshape(rows)
    picks = next_tokens.reshape(rows)
    history = jnp.take(beams.history, src_rows, axis=0)
    history = jax.lax.dynamic_update_slice(history, picks[:, None], (0, t + 1))
    return Beams(t, picks, next_scores.reshape(rows), history, done, hyps), src_rows


def finish(beams: Beams, settings: BeamStructure, beam_values: BeamValues) -> Hypotheses:
    """The hypotheses once the search has ended: the open beams of the prompts not done added in beam order
    (length BOS + every token, no EOS)."""
    k = settings.num_beams
    b = beams.done.shape[0]
    length = beams.step + 2  # BOS and steps 0..step
    denominator = jnp.power(length.astype(jnp.float32), beam_values.length_penalty)
    hyps = beams.hyps
    for beam in range(k):
        rows = jnp.arange(b) * k + beam
        score = jnp.take(beams.scores, rows) / denominator
        hyps = add_hypotheses(hyps, ~beams.done, score, jnp.take(beams.history, rows, axis=0), length, eos=False)
    return hyps


def ranked(hyps: Hypotheses) -> np.ndarray:
    """`(B, K)` slot indices best first (higher score first; among equal scores, the one added last)."""
    scores, order = np.asarray(hyps.scores), np.asarray(hyps.order)
    return np.stack([np.lexsort((-order[i], -scores[i])) for i in range(scores.shape[0])])
