"""The batch scheduler: jobs that join and leave a running batch get the answers and events they get alone.

Expected answers come from `Generator.generate` for each job alone (greedy), turned into text as the serial
worker does; the scheduler runs the tiny fixture model in a few slots.
"""

import threading
import time

import numpy as np
import pytest

from helpers import interleaved_requests
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.stops import cut_at_stop
from owl_jax.serve.errors import ApiError
from owl_jax.serve.scheduler import BatchScheduler
from owl_jax.serve.worker import Job, ModelWorker, TextStream, make_worker


def config(**options):
    return GenerationConfig(**{"eos_token_id": 2, "pad_token_id": 2, **options})


@pytest.fixture(scope="module")
def setup():
    model, processor, raw = interleaved_requests()
    jobs = [(ids[None], px, config(max_new_tokens=max_new, stop=stop)) for ids, px, max_new, stop in raw]
    generator = Generator(model, prompt_bucket=128, cache_bucket=256)  # one prefill and decode program
    return generator, processor, jobs


def alone(setup, ids, px, cfg):
    """`(text, finish_reason, prompt tokens, completion tokens)` of `Generator.generate` for the job alone."""
    generator, processor, _ = setup
    out = generator.generate(ids, None, px, cfg, decode=processor.decode)
    tokens = out.tokens[0]
    text = cut_at_stop(processor.decode([t for t in tokens if t != 2]), cfg.stop).strip()
    return text, "stop" if out.finished[0] else "length", ids.shape[1], len(tokens)


def events_of(job, timeout=60, out=()):
    out = list(out)
    while not out or out[-1][0] not in ("done", "error"):
        out.append(job.events.get(timeout=timeout))
    return out


def answer(events):
    kind, last = events[-1]
    assert kind == "done", last
    text = "".join(v for k, v in events if k == "delta")
    return text, last.finish_reason, last.prompt_tokens, last.completion_tokens


def slow(processor):
    """The processor's decode, 10 ms slower: an answer of n tokens takes at least n / 100 seconds."""

    def decode(ids):
        time.sleep(0.01)
        return processor.decode(ids)

    return decode


@pytest.fixture()
def scheduler(setup):
    generator, processor, _ = setup
    running = []

    def start(decode=None):
        worker = make_worker(generator, decode or processor.decode, slots=2, slot_length=256, prompt_buckets=(128,))
        worker.start()
        running.append(worker)
        return worker

    yield start
    for worker in running:
        worker.stop()
        assert not worker.is_alive()


def test_jobs_joining_a_running_batch_get_their_answers_alone(setup, scheduler):
    worker = scheduler()
    assert isinstance(worker, BatchScheduler)
    expected = [alone(setup, *job) for job in setup[2]]
    jobs = [Job(*job, label=f"job{i}") for i, job in enumerate(setup[2])]
    # Submitted at different times: each after the previous one has sent its first piece (or ended).
    firsts = []
    for job in jobs:
        worker.submit(job)
        firsts.append(job.events.get(timeout=60))
    assert [answer(events_of(job, out=[first])) for job, first in zip(jobs, firsts)] == expected
    assert any(e[1] == "stop" and c.stop for e, (_, _, c) in zip(expected, setup[2]))  # a stop string ended one
    assert worker.pending == 0


def test_a_cancelled_job_frees_its_slot_for_a_waiting_one(setup, scheduler):
    generator, processor, jobs = setup
    worker = scheduler(decode=slow(processor))  # a's 200 tokens take seconds: it is cancelled long before
    long = config(max_new_tokens=60, min_new_tokens=60)
    a = Job(*jobs[0][:2], config(max_new_tokens=200, min_new_tokens=200), label="a")
    b = Job(*jobs[1][:2], long, label="b")
    waiting = Job(*jobs[2], label="waiting")
    for job in (a, b, waiting):
        worker.submit(job)
    assert a.events.get(timeout=60)[0] == "delta" and waiting.events.empty()
    a.cancelled.set()
    kind, error = events_of(a)[-1]
    assert kind == "error" and error.status == 503 and "cancelled" in str(error)
    assert answer(events_of(waiting)) == alone(setup, *jobs[2])
    assert answer(events_of(b))[1:] == ("length", jobs[1][0].shape[1], 60)
    # A job cancelled while it waits never runs.
    gone = Job(*jobs[0], label="gone")
    gone.cancelled.set()
    worker.submit(gone)
    assert "cancelled" in str(events_of(gone)[-1][1])


def test_logprob_events_come_before_the_text_of_their_token(setup, scheduler):
    generator, processor, jobs = setup
    worker = scheduler()
    job = Job(*jobs[1], logprobs=True, top_logprobs=3)
    worker.submit(job)
    events = events_of(job)
    text, reason, _, completion = answer(events)
    entries = [v for k, v in events if k == "logprob"]
    assert len(entries) == completion  # the answer ran to max_new_tokens: no EOS
    assert (text, reason) == alone(setup, *jobs[1])[:2]
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy: the most likely token
        assert entry["top_logprobs"][0]["token"] == entry["token"] and bytes(entry["bytes"]) == entry["token"].encode()
    assert "".join(e["token"] for e in entries).strip() == text
    # Each token's entry arrives before the piece that first holds its text: whatever text has been sent
    # is text of tokens whose entries came before it.
    tokens, sent = "", ""
    for kind, value in events:
        if kind == "logprob":
            tokens += value["token"]
        elif kind == "delta":
            sent += value
            assert tokens.lstrip().startswith(sent)
    assert events[0][0] == "logprob"


def test_jobs_no_slot_takes_run_alone_between_steps(setup, scheduler):
    generator, processor, jobs = setup
    worker = scheduler()
    banned = config(max_new_tokens=8, no_repeat_ngram_size=2)
    serial = Job(jobs[4][0], jobs[4][1], banned)
    running = Job(*jobs[1])
    refused = Job(jobs[4][0], jobs[4][1], banned, logprobs=True)
    for job in (running, serial, refused):
        worker.submit(job)
    assert answer(events_of(serial)) == alone(setup, jobs[4][0], jobs[4][1], banned)
    assert answer(events_of(running)) == alone(setup, *jobs[1])
    kind, error = events_of(refused)[-1]
    assert kind == "error" and error.status == 400 and "no_repeat_ngram_size" in str(error)


def test_an_error_answers_its_job_only(setup, scheduler):
    generator, processor, jobs = setup
    worker = scheduler()

    def broken(*_):
        raise RuntimeError("no text for this token")

    worker.texts.entry = broken  # only jobs asking for logprobs look tokens up
    failing, fine = Job(*jobs[0], logprobs=True), Job(*jobs[1])
    mismatched = Job(jobs[2][0], jobs[0][1], jobs[2][2])  # an image placeholder run without its image
    for job in (failing, mismatched, fine):
        worker.submit(job)
    kind, error = events_of(failing)[-1]
    assert kind == "error" and error.status == 500 and "no text for this token" in str(error)
    kind, error = events_of(mismatched)[-1]
    assert kind == "error" and error.status == 400 and "image" in str(error)
    assert answer(events_of(fine)) == alone(setup, *jobs[1])
    assert worker.is_alive() and worker.pending == 0


def test_drain_waits_and_stop_cancels(setup, scheduler):
    generator, processor, jobs = setup
    worker = scheduler()
    quick = Job(*jobs[0])
    worker.submit(quick)
    assert worker.drain(60) and answer(events_of(quick))[0] == alone(setup, *jobs[0])[0]
    with pytest.raises(ApiError, match="shutting down"):
        worker.submit(Job(*jobs[0]))

    worker = scheduler(decode=slow(processor))  # 200 tokens take seconds: they are still going at the stop
    long = config(max_new_tokens=200, min_new_tokens=200)
    running = [Job(*jobs[0][:2], long), Job(*jobs[1][:2], long)]
    queued = Job(*jobs[2])
    for job in (*running, queued):
        worker.submit(job)
    assert all(job.events.get(timeout=60)[0] == "delta" for job in running)
    assert not worker.drain(0.2)
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    stopper.join(30)
    assert not worker.is_alive() and worker.pending == 0
    for job in (*running, queued):
        kind, error = events_of(job)[-1]
        assert kind == "error" and error.status == 503 and "shutting down" in str(error)


def test_make_worker_and_the_incremental_text_stream(setup):
    generator, processor, _ = setup
    assert isinstance(make_worker(generator, processor.decode), ModelWorker)
    assert isinstance(make_worker(object(), processor.decode, slots=4), ModelWorker)  # a stand-in without a model
    with pytest.raises(ValueError):
        make_worker(generator, processor.decode, slots=-1)
    # Decoding a few ids before each new one gives the text decoding them all gives, byte pieces included
    # (ids 3..258 of the fixture's vocabulary are the byte-fallback pieces).
    rng = np.random.default_rng(0)
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return processor.decode(ids)

    for low in [3] * 12 + [259] * 2:
        ids = rng.integers(low, 1024, size=120).tolist()
        calls.clear()
        stream = TextStream(decode, eos_token_id=2, stop=("xyz",))
        for token in ids:
            stream.push(token)
            assert stream.raw == processor.decode(stream.ids)
        assert stream.text + stream.finish() == processor.decode(ids).strip()
    # Without byte pieces: about one decode of at most 2·context + 1 ids per new id.
    assert max(calls) <= 2 * TextStream.context + 1 and len(calls) <= 1.2 * len(ids)
    # Several ids per decode (`add`, then `take`), byte pieces included: the same text, piece by piece.
    for low in [3] * 8 + [259] * 2:
        ids = rng.integers(low, 1024, size=120).tolist()
        stream, sent, at = TextStream(processor.decode, eos_token_id=2), "", 0
        while at < len(ids):
            n = int(rng.integers(1, 6))
            for token in ids[at : at + n]:
                stream.add(token)
            at += n
            sent += stream.take()
            assert stream.raw == processor.decode(ids[:at])
        assert sent + stream.finish() == processor.decode(ids).strip()
    stream = TextStream(processor.decode, eos_token_id=2)
    for token in ids:  # ids never taken: `finish` gives their whole text
        stream.add(token)
    assert stream.finish() == processor.decode(ids).strip()
