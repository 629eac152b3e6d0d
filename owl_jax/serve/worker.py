"""The thread that owns the model, and what its two kinds share: jobs in, text streamed back through queues.

HTTP handler threads validate and tokenize a request, then hand a `Job` to the worker `make_worker` built:
a `ModelWorker`, which runs a fresh `Generator.generate` per job, one at a time (its own KV cache, never
shared between requests), or a `owl_jax.serve.scheduler.BatchScheduler`, which decodes many jobs at once in
slots of one cache. Either puts events on the job's own queue: `("delta", text)` per decoded piece (and,
from the scheduler when `job.logprobs` is set, `("logprob", entry)` before the piece holding that token's
text), then `("done", Result)` or `("error", ApiError)`.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.stops import cut_at_stop, find_stop, visible_text
from owl_jax.serve.errors import ApiError

log = logging.getLogger("owl_jax.serve")


class TextStream:
    """Turns generated ids into text pieces whose concatenation is the answer, stripped of outer whitespace.

    The answer's text is the decode of all its ids (SentencePiece spacing depends on the neighbouring
    pieces), kept up to date without decoding the whole answer for every id: the ids from an anchor a few
    ids back (between `context` and 2·`context`) are decoded, and the text they gained since the last decode
    is the text the new ids added. Where that does not hold (a new id changed the text before it, as a byte
    piece that completes a UTF-8 character shown as U+FFFD so far does, or the ids before the new ones
    decode to nothing) the whole answer is decoded again. Ids come one at a time (`push`) or several per
    decode (`add` each, then `take`).
    Whitespace at the end is held back until more text follows (so the answer's trailing space or newline
    is never sent), and so is an unfinished UTF-8 character that byte-fallback pieces have only partly
    produced. With `stop` strings the text ends before the first one (`stopped` says a stop string has
    appeared: the answer is complete), and an ending that may still become one is held back too.
    """

    context = 8  # at least this many ids before the new one are decoded with it

    def __init__(self, decode: Callable[[list[int]], str], eos_token_id: int, stop: tuple[str, ...] = ()):
        self.decode, self.eos_token_id, self.stop = decode, eos_token_id, stop
        self.ids: list[int] = []
        self.raw = ""  # decode(self.ids)
        self.text = ""  # everything sent so far
        self.stopped = False
        self._anchor, self._tail = 0, ""  # decode(ids[anchor:decoded])
        self._decoded = 0  # ids decoded into `raw`

    def push(self, token: int) -> str:
        """Add one generated id; returns the new text to send (often "")."""
        self.add(token)
        return self.take()

    def add(self, token: int) -> None:
        """Add one generated id without decoding it yet (`take` decodes every id added since the last);
        `stopped` is only up to date after `take`."""
        if token != self.eos_token_id:
            self.ids.append(int(token))

    def take(self) -> str:
        """The new text to send for the ids added since the last `take` (often "")."""
        if self._decoded == len(self.ids):
            return ""
        self._decode_added()
        return self._advance(visible_text(self.raw, self.stop).strip().rstrip("\ufffd").rstrip())

    def finish(self) -> str:
        """The text still held back once generation has ended (the ids not yet taken included)."""
        self._decode_added()
        return self._advance(cut_at_stop(self.raw, self.stop).strip())

    def _decode_added(self) -> None:
        if self._decoded < len(self.ids):
            self.raw = self._extend(self.raw, self.ids, self._decoded)
            self._decoded = len(self.ids)
            self.stopped = bool(self.stop) and find_stop(self.raw, self.stop) is not None

    def _extend(self, raw: str, ids: list[int], old: int) -> str:
        """`decode(ids)`, given `raw == decode(ids[:old])`."""
        if old - self._anchor > 2 * self.context:
            self._anchor = old - self.context
            self._tail = self.decode(ids[self._anchor : old])
        tail, after = self._tail, self.decode(ids[self._anchor :])
        self._tail = after
        if self._anchor == 0:
            return after
        if not tail or not after.startswith(tail):  # the new id changed the text before it
            return self.decode(ids)
        return raw + after[len(tail) :]

    def _advance(self, text: str) -> str:
        # Sent text cannot be taken back; in the (unusual) case that re-decoding changed earlier characters
        # nothing more is sent until the text continues what was sent, so the pieces always add up.
        if not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text) :], text
        return new


@dataclasses.dataclass
class Result:
    """How a finished generation ended."""

    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(eq=False)  # jobs are compared by identity (a queue removes one)
class Job:
    """One request for the worker: a single prompt's ids `(1, L)`, its images `(N, 3, S, S)`, its videos
    `(V, 3, T, S, S)` (or None) and options. With `logprobs`, the batch scheduler reports every generated
    token's log-probability and the `top_logprobs` (0..20) most likely tokens; the serial worker cannot."""

    input_ids: np.ndarray
    pixel_values: np.ndarray
    config: GenerationConfig
    label: str = ""  # names the request in the log
    events: queue.Queue[tuple[str, object]] = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    video_pixel_values: np.ndarray | None = None
    logprobs: bool = False
    top_logprobs: int = 0


def cancelled_error(stopping: bool) -> ApiError:
    """The 503 a job gets when it is ended early: the server stopping, or its client gone."""
    return ApiError(
        503, "the server is shutting down" if stopping else "the request was cancelled", type="server_error"
    )


def failed_error(error: BaseException) -> ApiError:
    """The 500 a job gets when its generation raised `error`."""
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")


class _Cancelled(Exception):
    """Raised from the stream callback to abandon a generation whose client went away."""


def log_result(job: Job, result: Result, seconds: float) -> None:
    log.info(
        "%s: %d prompt tokens, %d images, %d videos, %d new tokens in %.2f s (%.1f tokens/s), finish %s",
        job.label,
        result.prompt_tokens,
        len(job.pixel_values),
        0 if job.video_pixel_values is None else len(job.video_pixel_values),
        result.completion_tokens,
        seconds,
        result.completion_tokens / max(seconds, 1e-9),
        result.finish_reason,
    )


def run_serial(generator: Generator, decode: Callable[[list[int]], str], job: Job, stopping: threading.Event) -> None:
    """Answer `job` with one `Generator.generate` call, streaming its text; ends early (503) once
    `job.cancelled` or `stopping` is set. Every outcome is an event on `job.events`."""
    cfg = job.config
    text = TextStream(decode, cfg.eos_token_id, cfg.stop)

    def check(*_) -> None:
        if job.cancelled.is_set() or stopping.is_set():
            raise _Cancelled

    def on_token(step: int, tokens: np.ndarray, finished: np.ndarray) -> None:
        check()
        piece = text.push(int(tokens[0]))
        if piece:
            job.events.put(("delta", piece))

    extra: dict[str, Any] = {"decode": decode} if cfg.stop else {}  # stop strings are found in the decoded text
    if cfg.num_beams > 1:  # beam search streams only once it has ended: cancel between its chunks too
        extra["on_progress"] = check
    start = time.perf_counter()
    try:
        out = generator.generate(
            job.input_ids, None, job.pixel_values, cfg, job.video_pixel_values, stream=on_token, **extra
        )
    except _Cancelled:
        log.info("%s cancelled (%s)", job.label, "server stopping" if stopping.is_set() else "client gone")
        job.events.put(("error", cancelled_error(stopping.is_set())))
        return
    except ValueError as e:  # inputs the model cannot take (validated earlier, so rare)
        job.events.put(("error", ApiError(400, str(e))))
        return
    except Exception as e:  # keep the worker alive for the next request
        log.exception("%s failed", job.label)
        job.events.put(("error", failed_error(e)))
        return
    rest = text.finish()
    if rest:
        job.events.put(("delta", rest))
    tokens = out.tokens[0]
    result = Result("stop" if out.finished[0] else "length", int(out.prompt_lengths[0]), len(tokens))
    log_result(job, result, time.perf_counter() - start)
    job.events.put(("done", result))


class JobThread(threading.Thread):
    """What both workers share: the job queue, the count of jobs not yet answered, and stopping.

    Stopping: `drain(grace)` refuses new jobs and waits up to `grace` seconds for the queued and running
    ones; `stop()` then cancels what is left (each gets a 503 "the server is shutting down") and ends the
    thread. Subclasses implement `run`, reading `jobs` (None ends the thread) and calling `_answered` once
    per job.
    """

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self._stopping = threading.Event()
        self._closed = False  # no new jobs (draining or stopped)
        self._pending = 0  # jobs submitted and not yet answered
        self._idle = threading.Condition()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def submit(self, job: Job) -> None:
        """Queue `job`; its events will arrive on `job.events`."""
        with self._idle:
            if self._closed or self._stopping.is_set() or not self.is_alive():
                raise ApiError(503, "the server is shutting down", type="server_error")
            self._pending += 1
        self.jobs.put(job)

    def drain(self, grace: float, interrupt: threading.Event | None = None) -> bool:
        """Refuse new jobs and wait up to `grace` seconds (less if `interrupt` is set) for the queued and
        running ones to finish; returns whether they all did."""
        deadline = time.monotonic() + max(0.0, grace)
        with self._idle:
            self._closed = True
            while self._pending and self.is_alive():
                left = deadline - time.monotonic()
                if left <= 0 or (interrupt is not None and interrupt.is_set()):
                    return False
                self._idle.wait(min(left, 0.1))
            return True

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running jobs early, refuse the queued ones and end the thread."""
        if self._stopping.is_set():
            return
        with self._idle:
            self._closed = True
        self._stopping.set()
        self._interrupt()
        self.jobs.put(None)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def _interrupt(self) -> None:
        """Called by `stop` (from another thread) after `_stopping` is set."""

    def _answered(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _refuse(self, job: Job) -> None:
        job.events.put(("error", cancelled_error(stopping=True)))
        self._answered()

    def _drop_if_cancelled(self, job: Job) -> bool:
        """Answer a job whose client went away while it waited (503); returns whether it had."""
        if not job.cancelled.is_set():
            return False
        log.info("%s cancelled before it started (client gone)", job.label)
        job.events.put(("error", cancelled_error(stopping=False)))
        self._answered()
        return True

    def _refuse_queued(self) -> None:
        """At shutdown: anything still queued gets an answer instead of waiting forever."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._refuse(job)


class ModelWorker(JobThread):
    """Runs jobs from a queue, one at a time, on one `Generator`.

    Args:
      generator: the model's generator (only this thread calls it).
      decode: ids → text (the processor's `decode`; the caller serializes it with tokenizer use elsewhere).

    Stopping as `JobThread`. A job whose `cancelled` is set while it waits in the queue is dropped without
    running.
    """

    def __init__(self, generator: Generator, decode: Callable[[list[int]], str]):
        super().__init__(name="owl-model-worker")
        self.generator, self.decode = generator, decode
        self.current: Job | None = None

    def _interrupt(self) -> None:
        current = self.current
        if current is not None:
            current.cancelled.set()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                break
            if self._stopping.is_set():
                self._refuse(job)
                continue
            if self._drop_if_cancelled(job):
                continue
            self.current = job
            try:
                run_serial(self.generator, self.decode, job, self._stopping)
            finally:
                self.current = None
                self._answered()
        self._refuse_queued()


def make_worker(generator: Any, decode: Callable[[list[int]], str], *, slots: int = 0, **options: Any) -> JobThread:
    """The model's worker thread (not started): a `ModelWorker` (one job at a time) when `slots` is 0, else
    a `BatchScheduler` decoding up to `slots` jobs at once (`options`: its keywords). A generator that is
    not a `Generator` (a stand-in without a model) always gets the `ModelWorker`."""
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    if not slots or not isinstance(generator, Generator):
        return ModelWorker(generator, decode)
    from owl_jax.serve.scheduler import BatchScheduler  # it builds on this module

    return BatchScheduler(generator, decode, slots=slots, **options)
