"""Waking the event loop from the worker: one thread-safe call wakes every request that got events."""

import asyncio
import threading

from owl_jax.serve.events import Doorbell, Notifier


class CountingLoop:
    """Stands in for an event loop: records `call_soon_threadsafe` calls; `run_pending` runs them."""

    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, callback, *args):
        self.calls.append((callback, args))

    def run_pending(self):
        calls, self.calls = self.calls, []
        for callback, args in calls:
            callback(*args)
        return len(calls)


def test_one_call_wakes_every_notifier_rung_before_it_runs():
    loop = CountingLoop()
    bell = Doorbell(loop)
    notifiers = [Notifier(bell) for _ in range(16)]
    queues = [n.queue() for n in notifiers]
    for i, q in enumerate(queues):  # a batch step: one event per request
        q.put(("delta", str(i)))
    assert len(loop.calls) == 1
    assert not any(n.ready.is_set() for n in notifiers)
    assert loop.run_pending() == 1
    assert all(n.ready.is_set() for n in notifiers)
    # Once it has run, the next event rings again.
    notifiers[0]._armed = False
    notifiers[0].ready.clear()
    queues[0].put(("delta", "again"))
    assert len(loop.calls) == 1 and loop.run_pending() == 1 and notifiers[0].ready.is_set()


def test_events_from_another_thread_reach_the_waiting_coroutines():
    async def main():
        bell = Doorbell(asyncio.get_running_loop())
        notifiers = [Notifier(bell) for _ in range(8)]
        queues = [n.queue() for n in notifiers]

        def worker():
            for step in range(5):
                for q in queues:
                    q.put(("delta", step))

        thread = threading.Thread(target=worker)
        thread.start()
        got = [[] for _ in queues]

        async def read(i):
            while len(got[i]) < 5:
                await notifiers[i].wait(5.0)
                while not queues[i].empty():
                    got[i].append(queues[i].get_nowait()[1])

        await asyncio.wait_for(asyncio.gather(*(read(i) for i in range(len(queues)))), 30)
        thread.join()
        return got

    assert asyncio.run(main()) == [list(range(5))] * 8


def test_a_closed_loop_is_ignored():
    loop = asyncio.new_event_loop()
    bell = Doorbell(loop)
    loop.close()
    notifier = Notifier(bell)
    notifier.notify()  # nobody waits any more: no error
    Notifier(bell).notify()  # and the bell is not left thinking a call is on its way
    assert bell._due == []


def test_a_stopped_client_watch_leaves_no_cycle_holding_the_jobs():
    """A request's jobs (and their pixels) are freed when the request ends, without waiting for a full
    garbage collection: the watch's cancelled task must not keep them in a reference cycle."""
    import gc
    import weakref

    from owl_jax.serve.app import ClientWatch

    class Job:
        def __init__(self):
            self.cancelled = threading.Event()

    class SilentClient:
        async def receive(self):
            await asyncio.Event().wait()  # never disconnects

    async def main():
        bell = Doorbell(asyncio.get_running_loop())
        jobs = [Job()]
        alive = weakref.ref(jobs[0])
        watch = ClientWatch(SilentClient(), jobs, Notifier(bell))
        await asyncio.sleep(0)  # the watch waits on the client
        watch.stop()
        await asyncio.sleep(0)  # the cancellation runs
        await asyncio.sleep(0)
        del jobs, watch
        return alive

    gc.collect()
    gc.disable()
    try:
        alive = asyncio.run(main())
        assert alive() is None
    finally:
        gc.enable()
