"""The thread that owns the model: requests run one at a time, their text streamed back through queues.

HTTP handler threads validate and tokenize a request, then hand a `Job` to the `ModelWorker`; the worker
runs a fresh `Generator.generate` for it (its own KV cache, never shared between requests) and puts events
on the job's own queue: `("delta", text)` per decoded piece, then `("done", Result)` or `("error", ApiError)`.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.stops import cut_at_stop, visible_text
from owl_jax.serve.errors import ApiError

log = logging.getLogger("owl_jax.serve")


class TextStream:
    """Turns generated ids into text pieces whose concatenation is the answer, stripped of outer whitespace.

    Every step re-decodes the whole answer (SentencePiece spacing depends on the neighbouring pieces) and
    sends what was added. Whitespace at the end is held back until more text follows (so the answer's
    trailing space or newline is never sent), and so is an unfinished UTF-8 character that byte-fallback
    pieces have only partly produced (it decodes as U+FFFD until its last byte arrives). With `stop` strings
    the text ends before the first one, and an ending that may still become one is held back too.
    """

    def __init__(self, decode: Callable[[list[int]], str], eos_token_id: int, stop: tuple[str, ...] = ()):
        self.decode, self.eos_token_id, self.stop = decode, eos_token_id, stop
        self.ids: list[int] = []
        self.text = ""  # everything sent so far

    def push(self, token: int) -> str:
        """Add one generated id; returns the new text to send (often "")."""
        if token == self.eos_token_id:
            return ""
        self.ids.append(int(token))
        return self._advance(visible_text(self.decode(self.ids), self.stop).strip().rstrip("\ufffd").rstrip())

    def finish(self) -> str:
        """The text still held back once generation has ended."""
        return self._advance(cut_at_stop(self.decode(self.ids), self.stop).strip())

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


@dataclasses.dataclass
class Job:
    """One request for the worker: a single prompt's ids `(1, L)`, its images `(N, 3, S, S)`, its videos
    `(V, 3, T, S, S)` (or None) and options."""

    input_ids: np.ndarray
    pixel_values: np.ndarray
    config: GenerationConfig
    label: str = ""  # names the request in the log
    events: queue.Queue[tuple[str, object]] = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    video_pixel_values: np.ndarray | None = None


class _Cancelled(Exception):
    """Raised from the stream callback to abandon a generation whose client went away."""


class ModelWorker(threading.Thread):
    """Runs jobs from a queue, one at a time, on one `Generator`.

    Args:
      generator: the model's generator (only this thread calls it).
      decode: ids → text (the processor's `decode`; the caller serializes it with tokenizer use elsewhere).

    Stopping: `drain(grace)` refuses new jobs and waits up to `grace` seconds for the queued and running
    ones; `stop()` then cancels what is left (each gets a 503 "the server is shutting down") and ends the
    thread. A job whose `cancelled` is set while it waits in the queue is dropped without running.
    """

    def __init__(self, generator: Generator, decode: Callable[[list[int]], str]):
        super().__init__(name="owl-model-worker", daemon=True)
        self.generator, self.decode = generator, decode
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.current: Job | None = None
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
        """Finish the running job early, refuse the queued ones and end the thread."""
        if self._stopping.is_set():
            return
        with self._idle:
            self._closed = True
        self._stopping.set()
        current = self.current
        if current is not None:
            current.cancelled.set()
        self.jobs.put(None)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def _answered(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def _refuse(self, job: Job) -> None:
        job.events.put(("error", ApiError(503, "the server is shutting down", type="server_error")))
        self._answered()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                break
            if self._stopping.is_set():
                self._refuse(job)
                continue
            if job.cancelled.is_set():  # its client went away while it waited
                log.info("%s cancelled before it started (client gone)", job.label)
                job.events.put(("error", ApiError(503, "the request was cancelled", type="server_error")))
                self._answered()
                continue
            self.current = job
            try:
                self._run(job)
            finally:
                self.current = None
                self._answered()
        while True:  # anything still queued at shutdown gets an answer instead of waiting forever
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._refuse(job)

    def _run(self, job: Job) -> None:
        cfg = job.config
        text = TextStream(self.decode, cfg.eos_token_id, cfg.stop)

        def check(*_) -> None:
            if job.cancelled.is_set() or self._stopping.is_set():
                raise _Cancelled

        def on_token(step: int, tokens: np.ndarray, finished: np.ndarray) -> None:
            check()
            piece = text.push(int(tokens[0]))
            if piece:
                job.events.put(("delta", piece))

        extra = {"decode": self.decode} if cfg.stop else {}  # stop strings are found in the decoded text
        if cfg.num_beams > 1:  # beam search streams only once it has ended: cancel between its chunks too
            extra["on_progress"] = check
        start = time.perf_counter()
        try:
            out = self.generator.generate(
                job.input_ids, None, job.pixel_values, cfg, job.video_pixel_values, stream=on_token, **extra
            )
        except _Cancelled:
            stopping = self._stopping.is_set()
            log.info("%s cancelled (%s)", job.label, "server stopping" if stopping else "client gone")
            why = "the server is shutting down" if stopping else "the request was cancelled"
            job.events.put(("error", ApiError(503, why, type="server_error")))
            return
        except ValueError as e:  # inputs the model cannot take (validated earlier, so rare)
            job.events.put(("error", ApiError(400, str(e))))
            return
        except Exception as e:  # keep the worker alive for the next request
            log.exception("%s failed", job.label)
            job.events.put(("error", ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")))
            return
        rest = text.finish()
        if rest:
            job.events.put(("delta", rest))
        seconds = time.perf_counter() - start
        tokens = out.tokens[0]
        result = Result("stop" if out.finished[0] else "length", int(out.prompt_lengths[0]), len(tokens))
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
        job.events.put(("done", result))
