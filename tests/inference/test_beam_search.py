"""Beam search's scorer and its loop over the KV cache, on a fake model whose logits come from tables.

`reference_beam_search` transcribes transformers 4.28's `beam_search` and `BeamSearchScorer` plainly, one
prompt at a time; the compiled search (several prompts in one batch, the cache rows gathered every step)
must pick the same hypotheses. Two hand-checked cases show `length_penalty` and `early_stopping` at work.
The released model's beams are checked in `test_released_beam.py`.
"""

import contextlib
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.inference.beam import BeamSearch, reorder_cache
from owl_jax.inference.generate import GenerationConfig
from owl_jax.modeling.llama import KVCache

pytestmark = pytest.mark.compile_quickly

PAD, BOS, EOS = 0, 1, 2
SLOTS = 16  # cache slots: the prompt's one (BOS) and up to 15 generated tokens


def fake_decode(graphdef, params, cache, tokens, positions, slot, key_valid):
    """A one-token step: the logits of pick t are `A[fed token] + B[token before it] + C[t]`, the token before
    read from the row's own cache (a beam continued from the wrong row gets the wrong logits). The prompt is
    BOS in slot 0 and pick t is fed at slot and position t + 1. `graphdef` is num_beams."""
    a, b, c = params
    prompt = jnp.arange(tokens.shape[0]) // graphdef
    before = jax.lax.dynamic_index_in_dim(cache.k[0, :, 0, :, 0], slot - 1, axis=1, keepdims=False).astype(jnp.int32)
    k = jax.lax.dynamic_update_slice(
        cache.k, tokens.astype(cache.k.dtype)[None, :, None, None, None], (0, 0, 0, slot, 0)
    )
    logits = a[prompt, tokens] + b[prompt, before] + c[prompt, positions]
    return logits, KVCache(k, cache.v), key_valid.at[:, slot].set(True)


@functools.cache
def fake_search(num_beams: int, decode_chunk: int) -> BeamSearch:
    """A `BeamSearch` over `fake_decode` (one per setting, so its compiled pieces are reused)."""
    fake = types.SimpleNamespace(
        cache_bucket=8, decode_chunk=decode_chunk, graphdef=num_beams, state=None, _ctx=contextlib.nullcontext
    )
    return BeamSearch(fake, fake_decode, lambda cache: cache, jax.jit)


def compiled_search(model, cfg, decode_chunk=3):
    """Hypotheses of `BeamSearch.run` for the prompts of `model` (tables `(A, B, C)`), best first."""
    a, b, c = model
    p = a.shape[0]
    search = fake_search(cfg.num_beams, decode_chunk)
    search.generator.state = model
    cache = jnp.zeros((1, p, 1, SLOTS, 1), jnp.float32).at[:, :, :, 0].set(BOS)
    logits = a[:, BOS] + b[:, BOS] + c[:, 0]
    key_valid = jnp.zeros((p, SLOTS), bool).at[:, 0].set(True)
    return search.run(logits, KVCache(cache, cache), key_valid, np.ones(p, int), 1, cfg)


def log_softmax(x):
    x = x.astype(np.float32)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def reference_beam_search(model, cfg):
    """transformers 4.28's beam search for one prompt (tables `(A, B, C)` as `fake_decode` reads them),
    written plainly: a list of `(tokens, score, finished)` best first. The hypothesis length is BOS and the
    tokens before EOS; the stopping test uses the next length, as 4.28 does for a prompt alone."""
    a, b, c = (np.asarray(x) for x in model)
    k, steps, penalty, vocab = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty, a.shape[0]
    beams = [([], np.float32(0.0))] + [([], np.float32(-1e9))] * (k - 1)
    kept, worst = [], 1e9  # kept: [score, tokens, finished] in the order they were added

    def add(tokens, total, length, finished):
        nonlocal worst
        score = total / np.float32(length) ** np.float32(penalty)
        if len(kept) < k or score > worst:
            kept.append((score, tokens, finished))
            if len(kept) > k:
                lowest = min(range(len(kept)), key=lambda i: (kept[i][0], i))
                del kept[lowest]
                worst = min(h[0] for h in kept)
            else:
                worst = min(score, worst)

    done, picks = False, 0
    for t in range(steps):
        candidates = []
        for j, (tokens, score) in enumerate(beams):
            seq = [BOS, *tokens]
            logprobs = log_softmax(a[seq[-1]] + b[seq[-2] if len(seq) > 1 else BOS] + c[t])
            if t < cfg.min_new_tokens:
                logprobs[EOS] = -np.inf
            candidates += [(np.float32(score + logprobs[v]), j * vocab + v) for v in range(vocab)]
        candidates = sorted(candidates, key=lambda c: (-c[0], c[1]))[: 2 * k]
        new = []
        for rank, (score, flat) in enumerate(candidates):
            j, v = divmod(flat, vocab)
            if v == EOS:
                if rank < k:
                    add(beams[j][0], score, 1 + t, True)
            else:
                new.append(([*beams[j][0], v], score))
            if len(new) == k:
                break
        beams, picks = new, t + 1
        if len(kept) >= k:
            if cfg.early_stopping is True:
                done = True
            else:
                longest = cfg.early_stopping == "never" and penalty > 0
                done = worst >= candidates[0][0] / np.float32(steps + 1 if longest else t + 2) ** np.float32(penalty)
        if done:
            break
    if not done:
        for tokens, score in beams:
            add(tokens, score, 1 + picks, False)
    order = sorted(range(len(kept)), key=lambda i: (kept[i][0], i), reverse=True)
    return [(kept[i][1] + [EOS] * kept[i][2], float(kept[i][0]), kept[i][2]) for i in order]


def tables(seed, prompts, vocab=10):
    """A random fake model: the step's term C keeps two orders of the same tokens from scoring alike."""
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1.5, (prompts, vocab, vocab)).astype(np.float32)
    a[:, :, EOS] += 1.0  # EOS often among the best: hypotheses finish at many steps
    a[:, :, [PAD, BOS]] = -30.0
    b = rng.normal(0, 1.0, (prompts, vocab, vocab)).astype(np.float32)
    c = rng.normal(0, 1.0, (prompts, SLOTS, vocab)).astype(np.float32)
    return jnp.asarray(a), jnp.asarray(b), jnp.asarray(c)


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_batched_search_matches_the_plain_transcription(early_stopping):
    """Two prompts in one batch; each must get what the transcription gives it alone."""
    cases = [(7, 1.0, 0), (5, 0.0, 0), (7, 2.0, 2), (6, -1.0, 0), (1, 1.0, 0), (4, 0.5, 1)] * 3
    for seed, (steps, penalty, min_new) in enumerate(cases):
        model = tables(seed, 2)
        cfg = GenerationConfig(
            max_new_tokens=steps,
            min_new_tokens=min_new,
            num_beams=3,
            length_penalty=penalty,
            early_stopping=early_stopping,
        )
        out = compiled_search(model, cfg)
        for prompt in range(2):
            expected = reference_beam_search([x[prompt] for x in model], cfg)
            got = out[prompt]
            assert [h.tokens for h in got] == [e[0] for e in expected], (seed, prompt)
            assert [h.finished for h in got] == [e[2] for e in expected]
            np.testing.assert_allclose([h.score for h in got], [e[1] for e in expected], rtol=1e-5)


def probability_tables(rows: dict[int, dict[int, float]], vocab: int = 6):
    """Tables for one prompt whose next-token probabilities depend on the last token only."""
    a = np.full((1, vocab, vocab), -1e4, np.float32)
    for last, probs in rows.items():
        for token, p in probs.items():
            a[0, last, token] = np.log(p)
    return jnp.asarray(a), jnp.zeros_like(a), jnp.zeros((1, SLOTS, vocab), np.float32)


def test_length_penalty_chooses_between_a_short_and_a_long_answer():
    # After BOS: 3 (0.6) or 4 (0.4). After 3: EOS (0.6) or 5 (0.4). After 4: 5. After 5: 5 (0.8) or EOS (0.2).
    # Step 1 finishes [3, EOS] (log-probability 2 log 0.6 = -1.022, length 2); the search then runs to the end
    # with the beams [4, 5, 5] (-1.139) and [3, 5, 5] (-1.650), both length 4.
    model = probability_tables({BOS: {3: 0.6, 4: 0.4}, 3: {EOS: 0.6, 5: 0.4}, 4: {5: 1.0}, 5: {5: 0.8, EOS: 0.2}})
    config = GenerationConfig(max_new_tokens=3, num_beams=2, length_penalty=1.0)
    # length_penalty 1: -1.022 / 2 = -0.511 loses to -1.139 / 4 = -0.285 and to -1.650 / 4 = -0.413.
    per_token = compiled_search(model, config)[0]
    assert [h.tokens for h in per_token] == [[4, 5, 5], [3, 5, 5]]
    np.testing.assert_allclose([h.score for h in per_token], [np.log(0.32) / 4, np.log(0.6 * 0.4 * 0.8) / 4], rtol=1e-6)
    assert not per_token[0].finished
    # length_penalty 0: the summed log-probabilities: -1.022 beats -1.139; -1.650 does not enter.
    summed = compiled_search(model, GenerationConfig(max_new_tokens=3, num_beams=2, length_penalty=0.0))[0]
    assert [h.tokens for h in summed] == [[3, EOS], [4, 5, 5]] and summed[0].finished
    np.testing.assert_allclose([h.score for h in summed], [2 * np.log(0.6), np.log(0.4 * 0.8)], rtol=1e-6)


def test_early_stopping_ends_the_search_at_num_beams_hypotheses():
    # After BOS: EOS (0.5), 3 (0.3) or 4 (0.2). After 3: EOS (0.6) or 5 (0.4). After 4: 5. After 5: 5 (0.95).
    # Step 0 finishes [EOS] (score log 0.5 = -0.693, length 1), step 1 finishes [3, EOS] ((log 0.3 + log 0.6) / 2
    # = -0.857): two hypotheses for two beams.
    rows = {BOS: {EOS: 0.5, 3: 0.3, 4: 0.2}, 3: {EOS: 0.6, 5: 0.4}, 4: {5: 1.0}, 5: {5: 0.95, EOS: 0.05}}
    model = probability_tables(rows)
    early = compiled_search(model, GenerationConfig(max_new_tokens=3, num_beams=2, early_stopping=True))[0]
    assert [h.tokens for h in early] == [[EOS], [3, EOS]]  # stopped there: the empty answer wins
    np.testing.assert_allclose([h.score for h in early], [np.log(0.5), np.log(0.3 * 0.6) / 2], rtol=1e-6)
    # False: the best beam after step 1 ([4, 5], -1.609) could still reach -1.609 / 3 = -0.536 > -0.857, so the
    # search goes on; the open beams [4, 5, 5] (-0.415) and [3, 5, 5] (-0.543) then push both out.
    for mode in (False, "never"):
        late = compiled_search(model, GenerationConfig(max_new_tokens=3, num_beams=2, early_stopping=mode))[0]
        assert [h.tokens for h in late] == [[4, 5, 5], [3, 5, 5]]
        assert not any(h.finished for h in late)


def test_decode_chunks_do_not_change_the_beams():
    model = tables(11, 2)
    cfg = GenerationConfig(max_new_tokens=7, num_beams=3)
    runs = [compiled_search(model, cfg, decode_chunk=chunk) for chunk in (1, 2, 16)]
    assert runs[0] == runs[1] == runs[2]


def test_reorder_cache_gathers_rows_in_both_layouts():
    rows = jnp.array([2, 2, 0])
    stacked = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 1, 4, 1)  # (layers, B, heads, S, Dh)
    gathered = reorder_cache(KVCache(stacked, -stacked), rows)
    np.testing.assert_array_equal(gathered.k, stacked[:, [2, 2, 0]])
    np.testing.assert_array_equal(gathered.v, -stacked[:, [2, 2, 0]])
    per_layer = KVCache(tuple(stacked), tuple(-stacked))  # one (B, heads, S, Dh) buffer per layer
    gathered = reorder_cache(per_layer, rows)
    assert gathered.per_layer and len(gathered.k) == 2
    for layer in range(2):
        np.testing.assert_array_equal(gathered.k[layer], stacked[layer, [2, 2, 0]])
        np.testing.assert_array_equal(gathered.v[layer], -stacked[layer, [2, 2, 0]])


@pytest.mark.parametrize(
    "options, field",
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 2.5}, "num_beams"),
        ({"num_beams": True}, "num_beams"),
        ({"num_beams": 3, "do_sample": True}, "num_beams"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"length_penalty": "long"}, "length_penalty"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"early_stopping": 1}, "early_stopping"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
    ],
)
def test_config_errors_are_one_line_naming_the_field(options, field):
    with pytest.raises(ValueError) as caught:
        GenerationConfig(**options).validate()
    message = str(caught.value)
    assert message.startswith(field) and "\n" not in message


def test_config_defaults_and_stop_forms():
    config = GenerationConfig().validate()
    assert (config.num_beams, config.length_penalty, config.early_stopping, config.stop) == (1, 1.0, False, ())
    assert GenerationConfig(stop="###").stop == ("###",) and GenerationConfig(stop=["a", "b"]).stop == ("a", "b")
    assert hash(GenerationConfig(stop=["a"])) == hash(GenerationConfig(stop=("a",)))  # still hashable
    assert GenerationConfig(num_beams=4, early_stopping="never", length_penalty=-0.5).validate().num_beams == 4
