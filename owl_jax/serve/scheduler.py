"""The batching worker: many jobs decode at once in the slots of one KV cache (continuous batching).

`BatchScheduler` is a `ModelWorker` stand-in (same methods, same events, same shutdown) built on
`owl_jax.inference.slot_batch`, which runs `steps_per_call` decode steps per device call. Between two calls
it takes the jobs submitted meanwhile: each one a slot can serve is prefilled into a free row and joins the
running batch at the next call; jobs wait in order while every row is taken; a job whose client went away
(`job.cancelled`) leaves its row at the next call with a 503. A job ends, and frees its row, at EOS, at
`max_new_tokens` or once its text holds a stop string (`TextStream.stopped`). Its text goes out as one
delta event per call (decoded once for the call's tokens; token by token when it has stop strings or asks
for log-probabilities, whose events precede their token's text). Jobs a slot cannot serve (beam search,
n-gram bans, prompts longer than a slot) run whole through `Generator.generate` (`worker.run_serial`, as
the serial worker runs them) between two calls. An error in one job answers that job with a 500; a failed
call fails the jobs in the batch and the scheduler goes on with a fresh one.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import time
from collections.abc import Callable, Sequence

from owl_jax.inference.generate import Generator
from owl_jax.inference.slot_batch import SlotBatch, SlotRequest, TokenLogprob
from owl_jax.inference.slots import SlotDecoder
from owl_jax.serve.errors import ApiError
from owl_jax.serve.logprobs import TokenTexts
from owl_jax.serve.options import MAX_TOP_LOGPROBS
from owl_jax.serve.worker import (
    Job,
    JobThread,
    Result,
    TextStream,
    cancelled_error,
    failed_error,
    log_result,
    run_serial,
)

log = logging.getLogger("owl_jax.serve")


@dataclasses.dataclass(eq=False)
class _Running:
    """A job decoding in a slot."""

    job: Job
    request: SlotRequest
    text: TextStream
    start: float
    pending: list[str] = dataclasses.field(default_factory=list)  # text made since the last delta event

    def send_text(self) -> None:
        """One delta event for the text its tokens made since the last one (none when they made none)."""
        piece = self.text.take()
        if piece:
            self.pending.append(piece)
        if self.pending:
            self.job.events.put(("delta", "".join(self.pending)))
            self.pending.clear()


class BatchScheduler(JobThread):
    """Runs jobs on one `Generator`, up to `slots` of them decoding together.

    Args:
      generator: the model's generator (only this thread calls it).
      decode: ids → text (the processor's `decode`; the caller serializes it with tokenizer use elsewhere).
      slots: rows of the shared KV cache (jobs decoding at once).
      slot_length: cache columns per row: prompt + max_new_tokens of a slot job (default: the model's
        `max_position_embeddings`).
      prompt_buckets: prompt lengths are padded up to these (one compiled prefill each; `SlotDecoder`).
      steps_per_call: decode steps per device call (`SlotBatch`); a job's text goes out once per call.
    """

    def __init__(
        self,
        generator: Generator,
        decode: Callable[[list[int]], str],
        *,
        slots: int = 16,
        slot_length: int | None = None,
        prompt_buckets: Sequence[int] | None = None,
        steps_per_call: int = 1,
    ):
        super().__init__(name="owl-batch-scheduler")
        self.generator, self.decode = generator, decode
        self.decoder = SlotDecoder(
            generator, slots, length=slot_length, prompt_buckets=prompt_buckets, top_logprobs=MAX_TOP_LOGPROBS
        )
        self.batch = SlotBatch(self.decoder, steps_per_call)
        self.texts = TokenTexts(decode)
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[SlotRequest, _Running] = {}
        self._ended = False  # None came through the queue

    # ----------------------------------------------------------------------------------- the loop
    def run(self) -> None:
        try:
            while not self._ended and not self._stopping.is_set():
                self._take_jobs(block=not self.batch.busy and not self.waiting)
                if self._ended or self._stopping.is_set():
                    break
                try:
                    self._cancel_gone()
                    self._start_waiting()
                    ended = self.batch.advance()
                    for running in self.running.values():
                        running.send_text()
                    for request in ended:
                        self._finish(request)
                except Exception as e:  # never let one bad step end the thread
                    log.exception("the batch failed")
                    self.batch.fail_all(e)
                    for request in self.batch.flush():
                        self._finish(request)
        finally:
            self._shut_down()

    def _take_jobs(self, block: bool) -> None:
        while True:
            try:
                job = self.jobs.get() if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if job is None:
                self._ended = True
                return
            self.waiting.append(job)

    def _cancel_gone(self) -> None:
        for running in list(self.running.values()):
            if running.job.cancelled.is_set():
                log.info("%s cancelled (client gone)", running.job.label)
                self.batch.release(running.request)
        for job in [j for j in self.waiting if j.cancelled.is_set()]:
            self.waiting.remove(job)
            self._drop_if_cancelled(job)

    def _start_waiting(self) -> None:
        """Admit waiting jobs in order while rows are free; a job no slot can serve runs here and now."""
        while self.waiting and not self._stopping.is_set():
            job = self.waiting[0]
            n_videos = 0 if job.video_pixel_values is None else len(job.video_pixel_values)
            reason = self.decoder.refuses(job.input_ids.shape[-1], job.config, n_videos)
            if reason is None and not self.batch.free:
                return
            self.waiting.popleft()
            if reason is not None:
                self._run_serial(job, reason)
            else:
                self._admit(job)

    def _run_serial(self, job: Job, reason: str) -> None:
        try:
            if job.logprobs:
                job.events.put(("error", ApiError(400, f"logprobs are not available with {reason}", param="logprobs")))
                return
            log.info("%s runs alone: %s", job.label, reason)
            run_serial(self.generator, self.decode, job, self._stopping)
        finally:
            self._answered()

    def _admit(self, job: Job) -> None:
        cfg = job.config
        text = TextStream(self.decode, cfg.eos_token_id, cfg.stop)
        top = max(0, min(int(job.top_logprobs), MAX_TOP_LOGPROBS))

        def on_token(token: int, logprob: TokenLogprob | None) -> bool:
            if logprob is not None:
                if running.pending:  # the text of the tokens before this one goes first
                    running.send_text()
                job.events.put(("logprob", self.texts.entry(token, logprob, top)))
            text.add(token)
            if cfg.stop or job.logprobs:  # a stop string ends the answer at its token; logprobs precede their text
                piece = text.take()
                if piece:
                    running.pending.append(piece)
            return text.stopped

        request = SlotRequest(
            job.input_ids[0], job.pixel_values, cfg, on_token, bool(job.logprobs), job.video_pixel_values
        )
        running = _Running(job, request, text, time.perf_counter())
        try:
            self.batch.admit(request)
        except ValueError as e:  # inputs the model cannot take (validated earlier, so rare)
            request.on_token = None  # no cycle left behind (see `_finish`)
            job.events.put(("error", ApiError(400, str(e))))
            self._answered()
            return
        self.running[request] = running
        if request.done:  # the admission itself failed
            self._finish(request)

    def _finish(self, request: SlotRequest) -> None:
        running = self.running.pop(request, None)
        if running is None:
            return
        # The callback refers to its `_Running`, which holds the request: a cycle that would keep the job
        # (its pixels and events) alive until a full garbage collection, which a busy server seldom runs.
        request.on_token = None
        job = running.job
        try:
            running.send_text()
            reason = request.finish_reason
            if reason in ("stop", "length"):
                try:
                    rest = running.text.finish()
                except Exception as e:
                    reason, request.error = "error", e
                else:
                    if rest:
                        job.events.put(("delta", rest))
                    result = Result(reason, int(job.input_ids.shape[-1]), len(request.tokens))
                    log_result(job, result, time.perf_counter() - running.start)
                    job.events.put(("done", result))
                    return
            if reason == "cancelled":
                job.events.put(("error", cancelled_error(self._stopping.is_set())))
                return
            e = request.error
            log.error("%s failed: %s: %s", job.label, type(e).__name__, e, exc_info=e)
            job.events.put(("error", failed_error(e)))
        finally:
            self._answered()

    def _shut_down(self) -> None:
        """Every job still here gets its answer: the running ones and the waiting ones a 503."""
        self._stopping.set()
        for request in list(self.running):
            self.batch.release(request)
        for request in self.batch.flush():
            self._finish(request)
        while self.waiting:
            self._refuse(self.waiting.popleft())
        self._refuse_queued()
