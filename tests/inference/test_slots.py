"""Decode slots: requests that join and leave a running batch decode exactly as they do alone.

The references are `Generator.generate` for each request alone (greedy), the slots' own answer for a seeded
sampled request alone, and the model's plain forward pass over prompt + answer for the log-probabilities.
"""

import jax
import numpy as np
import pytest

from helpers import interleaved_requests
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.slot_batch import SlotBatch, SlotRequest
from owl_jax.inference.slots import SlotDecoder, default_buckets
from owl_jax.inference.stops import find_stop

pytestmark = pytest.mark.compile_quickly

BUCKETS = (64, 128)
STEPS = 3  # decode steps per call from half the rows on: requests end anywhere inside a call


@pytest.fixture(scope="module")
def setup():
    model, processor, raw = interleaved_requests()
    requests = []
    for ids, px, max_new, stop in raw:
        config = GenerationConfig(max_new_tokens=max_new, eos_token_id=2, pad_token_id=2, stop=stop)
        requests.append((ids, px, config))
    generator = Generator(model, prompt_bucket=128, cache_bucket=256)  # one prefill and decode program
    alone = [generator.generate(i[None], None, px, c, decode=processor.decode).tokens[0] for i, px, c in requests]
    decoder = SlotDecoder(generator, 4, length=256, prompt_buckets=BUCKETS)
    return model, processor, requests, alone, decoder


def slot_request(processor, ids, px, config, **options):
    """A request whose callback ends it at a stop string, as the server's text stream does."""
    seen = []

    def on_token(token, logprob):
        seen.append((token, logprob))
        text = processor.decode([t for t, _ in seen if t != config.eos_token_id])
        return bool(config.stop) and find_stop(text, config.stop) is not None

    request = SlotRequest(ids, px, config, on_token, **options)
    request.seen = seen
    return request


def run(batch, requests, every=1):
    """Admit `requests` in order, one every `every` steps while a row is free; step until all have ended."""
    todo, ended, step = list(requests), [], 0
    while todo or batch.busy:
        if todo and batch.free and step % every == 0:
            batch.admit(todo.pop(0))
        ended += batch.advance()
        step += 1
    return ended


def lowerings_during(fn):
    """How many programs jax lowers (compiles or fetches from the persistent cache) while `fn` runs."""
    events = []
    listener = lambda event, *_, **__: events.append(event) if event.endswith("jaxpr_to_mlir_module_duration") else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_buckets_and_refusals(setup):
    decoder = setup[4]
    assert default_buckets(64, 2048) == (64, 128, 256, 512, 1024, 2048) and default_buckets(64, 100) == (64, 100)
    assert decoder.bucket(8) == 64 and decoder.bucket(65) == 128 and decoder.bucket(129) is None
    assert decoder.refuses(100, GenerationConfig(max_new_tokens=8)) is None
    assert "beam" in decoder.refuses(10, GenerationConfig(num_beams=2))
    assert "no_repeat" in decoder.refuses(10, GenerationConfig(no_repeat_ngram_size=2))
    assert "exceed" in decoder.refuses(129, GenerationConfig(max_new_tokens=8))
    assert "exceed" in decoder.refuses(100, GenerationConfig(max_new_tokens=157))
    assert "video" in decoder.refuses(10, GenerationConfig(), videos=1)


def test_interleaved_greedy_requests_equal_each_alone_and_compile_nothing(setup):
    model, processor, requests, alone, decoder = setup
    batch = SlotBatch(decoder, STEPS)
    before = decoder.compiled()  # the programs are shared with other decoders of the model
    sampled = GenerationConfig(max_new_tokens=2, do_sample=True, top_k=5, top_p=0.9, eos_token_id=2, pad_token_id=2)
    run(batch, [slot_request(processor, requests[2][0], requests[2][1], sampled)])

    # Eight requests, at most four at a time, joining every third call as rows free up (the ring's write
    # column is wherever the earlier requests left it, and its length follows the longest live request).
    def interleave():
        slots = [slot_request(processor, *r) for r in requests]
        run(batch, slots, every=3)
        for request, expected, (ids, _, config) in zip(slots, alone, requests):
            assert request.tokens == expected, f"{len(ids)} prompt tokens"
            eos_or_stop = expected[-1] == 2 or bool(config.stop) and len(expected) < config.max_new_tokens
            assert request.finish_reason == ("stop" if eos_or_stop else "length")
        assert any(r.finish_reason == "stop" and r.config.stop for r in slots)  # a stop string ended one

    interleave()  # compiles what the mix needs, within the buckets' bounds
    compiled, rings = decoder.compiled(), decoder.rings
    admits = sum(p <= r for p in decoder.buckets for r in rings)
    steps = 2 * 2 * len(rings)  # with and without sampling rows, one step or STEPS per call, per ring length
    bounds = {"admit": admits, "step": steps, "encode": 1, "resize": len(rings) * (len(rings) - 1)}
    assert all(compiled[k] - before[k] <= n for k, n in bounds.items()), (compiled, before, bounds)
    assert lowerings_during(interleave) == 0 and decoder.compiled() == compiled  # the same mix again


def test_steps_per_call_follow_the_busy_rows(setup):
    model, processor, requests, alone, decoder = setup
    batch = SlotBatch(decoder, STEPS)
    assert [batch.steps_for(n) for n in range(decoder.rows + 1)] == [1, 1, STEPS, STEPS, STEPS]
    calls = []
    step = decoder.step

    def record(sample, count=1):
        calls.append((int(decoder.live.sum()), count))
        return step(sample, count)

    decoder.step = record
    try:
        slots = [slot_request(processor, *r) for r in requests[:4]]
        run(batch, slots)  # they join one per call while rows are free, then leave as they end
    finally:
        del decoder.step
    assert {count for live, count in calls if 2 * live >= decoder.rows} == {STEPS}
    assert {count for live, count in calls if 2 * live < decoder.rows} == {1}
    assert [r.tokens for r in slots] == alone[:4]


def test_the_ring_follows_the_longest_live_request(setup):
    model, processor, requests, alone, decoder = setup
    batch = SlotBatch(decoder, STEPS)
    short, long = requests[0], requests[4]  # 8 and 127 prompt tokens
    assert len(short[0]) <= BUCKETS[0] < len(long[0]) <= BUCKETS[1] and decoder.rings == (*BUCKETS, 256)
    a = slot_request(processor, *short)
    batch.admit(a)
    batch.advance()
    assert decoder.ring == BUCKETS[0]
    b = slot_request(processor, *long)
    batch.admit(b)  # grows the ring to its prompt's bucket, keeping the short request's keys
    assert decoder.ring == BUCKETS[1]
    run(batch, [])
    assert a.tokens == alone[0] and b.tokens == alone[4]
    c = slot_request(processor, *short)
    batch.admit(c)
    batch.advance()
    assert decoder.ring == BUCKETS[0]  # the long request has left
    run(batch, [])
    assert c.tokens == alone[0]


def test_a_released_request_frees_its_row_for_the_next(setup):
    model, processor, requests, alone, decoder = setup
    batch = SlotBatch(decoder, STEPS)
    long = GenerationConfig(max_new_tokens=40, min_new_tokens=40, eos_token_id=2, pad_token_id=2)
    first = [slot_request(processor, requests[i][0], requests[i][1], long) for i in range(4)]
    for request in first:
        batch.admit(request)
    for _ in range(3):
        batch.advance()
    assert batch.free == 0
    batch.release(first[1])
    assert first[1].finish_reason == "cancelled" and batch.free == 1
    later = slot_request(processor, *requests[7])
    batch.admit(later)
    seen = len(first[1].tokens)
    run(batch, [])
    assert later.tokens == alone[7] and len(first[1].tokens) == seen
    assert all(len(r.tokens) == 40 and r.finish_reason == "length" for r in first if r is not first[1])


def test_a_seeded_sample_is_the_same_alone_and_in_a_busy_batch(setup):
    model, processor, requests, alone, decoder = setup
    config = GenerationConfig(
        max_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, seed=7, eos_token_id=2, pad_token_id=2
    )
    ids, px, _ = requests[5]
    batch = SlotBatch(decoder, STEPS)
    by_itself = slot_request(processor, ids, px, config)
    run(batch, [by_itself])
    others = [slot_request(processor, *requests[i]) for i in (1, 4)]
    other_sample = slot_request(
        processor, requests[3][0], requests[3][1], GenerationConfig(**{**config.__dict__, "seed": 8})
    )
    busy = slot_request(processor, ids, px, config)
    run(batch, [others[0], other_sample, others[1], busy], every=2)
    assert busy.tokens == by_itself.tokens and len(busy.tokens) == 12
    assert others[0].tokens == alone[1] and others[1].tokens == alone[4]
    assert other_sample.tokens != busy.tokens


def test_logprobs_are_the_log_softmax_of_the_model_logits(setup):
    model, processor, requests, alone, decoder = setup
    ids, px, config = requests[2]
    batch = SlotBatch(decoder, STEPS)
    request = slot_request(processor, ids, px, config, logprobs=True)
    run(batch, [request])
    assert request.tokens == alone[2]
    # The reference: one forward pass over the prompt and the answer, logits at the positions that chose.
    full = np.concatenate([ids, np.asarray(request.tokens[:-1], np.int32)])[None]
    logits = model(px, full)[0, len(ids) - 1 :]
    reference = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))
    for step, (token, lp) in enumerate(request.seen):
        if token == config.eos_token_id:
            assert lp is None
            continue
        assert lp.top_ids[0] == token and lp.logprob == lp.top_logprobs[0]  # greedy: the most likely token
        assert np.all(np.diff(lp.top_logprobs) <= 0) and len(lp.top_ids) == decoder.top_n
        np.testing.assert_allclose(lp.logprob, reference[step, token], atol=1e-4)
        np.testing.assert_allclose(lp.top_logprobs, reference[step, lp.top_ids], atol=1e-4)
        assert set(lp.top_ids) == set(np.argsort(-reference[step])[: decoder.top_n])


def test_a_generator_with_per_layer_weights(setup):
    """Per-layer weights with fused projections (`unstack_layers=True`) go to the steps as they are."""
    model, processor, requests, alone, _ = setup
    generator = Generator(model, unstack_layers=True)
    assert generator.state[2] is not None  # fused q/k/v and gate/up kernels
    decoder = SlotDecoder(generator, 2, length=256, prompt_buckets=(32,))
    batch = SlotBatch(decoder, STEPS)
    slots = [slot_request(processor, *requests[i]) for i in (0, 2)]
    run(batch, slots, every=2)
    assert [r.tokens for r in slots] == [alone[0], alone[2]]
