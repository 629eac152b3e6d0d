"""Hooks: the caller's code, run by the training loop at fixed points.

The loop decides *when* (the points below) and hands over what it knows there; a hook decides *what*
(report progress, record metrics, or, in a test, crash the process or simulate a preemption). That keeps
such cases out of the loop itself, in the manner of levanter's `TrainerHooks`. A hook cannot change the
training state: it sees the stage, the step and the step's logged metrics, and it may ask the loop to stop.
A stop request is handled exactly like a preemption notice (SIGTERM): the loop saves a checkpoint of that
step and exits with status 128 + the signal number, at the same step on every process of a multi-host run
(so all processes must request it at the same step, as a signal sent to all of them would).

Points:
  step end: after each optimizer step, once that step's checkpoint save (when one is due) has started (an
    asynchronous save may still be in flight) and before the loop checks for a stop request.

    hooks = TrainerHooks()
    hooks.add_step_end(lambda info: print(info.stage, info.step, info.metrics), every=10)
    hooks.add_step_end(lambda info: info.request_stop() if info.step == 3 else None)
    owl_jax.training.run.run(config, hooks=hooks)
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a step-end hook sees."""

    stage: str  # the stage's name in `config.stages`
    step: int  # optimizer steps done in this stage (1 after its first step)
    total_steps: int  # the stage's `steps`
    metrics: Mapping[str, float] | None  # the values written to the metrics log at this step, else None
    _stop: Callable[[int], None] = dataclasses.field(repr=False)  # the loop's stop request

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop after this step as if signal `signum` had arrived: save this step, exit with 128 + signum."""
        self._stop(signum)


StepHook = Callable[[StepInfo], None]


class TrainerHooks:
    """Hooks to run at the training loop's fixed points (see the module docstring)."""

    def __init__(self) -> None:
        self._step_end: list[tuple[int, StepHook]] = []

    def add_step_end(self, hook: StepHook, *, every: int = 1) -> StepHook:
        """Run `hook(info)` at the end of every `every`-th step of each stage; returns `hook`."""
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every} for {hook!r}")
        self._step_end.append((every, hook))
        return hook

    def step_end(self, info: StepInfo) -> None:
        """Called by the loop: run the step-end hooks due at `info.step`, in the order they were added."""
        for every, hook in self._step_end:
            if info.step % every == 0:
                hook(info)
