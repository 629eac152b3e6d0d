"""The model worker's events, read on the event loop without blocking it.

The worker (a thread) puts each job's events on `job.events`, a `queue.Queue`: `("logprob", entry)`,
`("delta", text)`, then `("done", Result)` or `("error", ApiError)`. A request's jobs (one per choice) get
`NotifyingQueue`s of one `Notifier`: every `put` also schedules, thread-safely, a wake-up of the coroutine
that answers the request, which then takes what has arrived with `get_nowait`. So the event loop never
waits on a queue, and an answer's pieces are sent as soon as they are made. The wake-ups of all requests
go through the loop's one `Doorbell`: a batch step that puts events for many requests in a row schedules
one thread-safe call, not one per request (each such call writes to the loop's self-pipe, and each write
lets the event loop's thread take the interpreter lock from the worker in the middle of its step).
`job_events` merges the jobs' events into batches of what has arrived, and checks every `poll` seconds
that the worker is still alive.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from owl_jax.serve.errors import ApiError

POLL_SECONDS = 0.2  # while no event comes, how often the worker's liveness is checked


class Doorbell:
    """Wakes `Notifier`s of one event loop from any thread, with one thread-safe call for all the wake-ups
    asked for before it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._due: list[Notifier] = []  # to wake at the next call; non-empty: that call is scheduled

    def ring(self, notifier: Notifier) -> None:
        """Wake `notifier`'s waiter soon (does nothing once the loop has closed)."""
        with self._lock:
            self._due.append(notifier)
            if len(self._due) > 1:  # a call is on its way and will wake this one too
                return
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            with self._lock:
                self._due.clear()

    def _wake(self) -> None:
        with self._lock:
            due, self._due = self._due, []
        for notifier in due:
            notifier.ready.set()


class Notifier:
    """Wakes the coroutine answering one request when any of its queues gets an event (from any thread)."""

    def __init__(self, doorbell: Doorbell):
        self.doorbell = doorbell
        self.ready = asyncio.Event()
        self._armed = False  # a wake-up is on its way and the waiter has not yet looked at the queues

    def queue(self) -> NotifyingQueue:
        """A new queue whose `put`s wake this notifier (a job's `events`)."""
        return NotifyingQueue(self)

    def notify(self) -> None:
        """Wake the waiting coroutine; callable from any thread (does nothing once the loop has closed).

        One wake-up serves every event put before the waiter looks at its queues again, so a stream of
        tokens costs the event loop one wake-up per look, not one per token."""
        if self._armed:
            return
        self._armed = True
        self.doorbell.ring(self)

    async def wait(self, timeout: float) -> None:
        """Return once notified (at once if notified since the last wait), or after `timeout` seconds; the
        caller then looks at its queues (events put from here on wake it again)."""
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            pass
        self._armed = False
        self.ready.clear()


class NotifyingQueue(queue.Queue):
    """A job's event queue that wakes its request's `Notifier` on every `put`."""

    def __init__(self, notifier: Notifier):
        super().__init__()
        self.notifier = notifier

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.notifier.notify()


async def job_events(
    jobs: Sequence[Any],
    notifier: Notifier,
    worker_alive: Callable[[], bool],
    poll: float = POLL_SECONDS,
    stop: Callable[[], bool] = lambda: False,
) -> AsyncIterator[list[tuple[int, str, Any]]]:
    """The jobs' events as they arrive, each batch every `(job index, kind, value)` that has arrived since the
    last (in arrival order per job), until every job has ended ("done" or "error") or `stop()` is true
    (checked whenever the notifier wakes, e.g. once the client has gone). A job still unfinished when the
    worker has stopped ends with an ApiError 503. A streamed answer writes one batch at a time: when the
    event loop falls behind the worker, the tokens waiting go out in one write instead of one each."""
    ended = [False] * len(jobs)
    while not all(ended) and not stop():
        batch = []
        for i, job in enumerate(jobs):
            while not ended[i]:
                try:
                    kind, value = job.events.get_nowait()
                except queue.Empty:
                    break
                ended[i] = kind in ("done", "error")
                batch.append((i, kind, value))
        if batch:
            yield batch
            continue
        if all(ended):
            continue
        await notifier.wait(poll)
        if not worker_alive():
            lost = [i for i, job in enumerate(jobs) if not ended[i] and job.events.empty()]
            for i in lost:
                ended[i] = True
            if lost:
                yield [(i, "error", ApiError(503, "the model worker has stopped", type="server_error")) for i in lost]
