"""Training with injected faults, for the crash and preemption tests: `owl-train`'s `--config` flags plus

    --kill_at_step N         SIGKILL this process right after step N's checkpoint save has started (an
                             asynchronous save may still be in flight), as a crash would
    --kill_delay_ms D        with --kill_at_step: kill D milliseconds later instead (training and the save
                             go on meanwhile), so the kill lands at an arbitrary point of a save or a step
    --kill_before_commit N   SIGKILL this process inside the save of step N, once all of it is written and
                             just before Orbax commits it (renames its temporary folder)
    --stop_at_step N         stop at step N as if a preemption notice (SIGTERM) had arrived during it

The step faults act through the training loop's hooks (`owl_jax.training.hooks`), in every stage that
reaches step N; the commit fault wraps Orbax's commit of a temporary checkpoint folder.
"""

import os
import signal
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from owl_jax.training.hooks import StepInfo, TrainerHooks
from owl_jax.training.run import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_KILL_AT = flags.DEFINE_integer("kill_at_step", None, "SIGKILL this process after step N's save has started.")
_KILL_DELAY = flags.DEFINE_float("kill_delay_ms", 0.0, "With --kill_at_step: kill this many milliseconds later.")
_KILL_COMMIT = flags.DEFINE_integer("kill_before_commit", None, "SIGKILL inside step N's save, before its commit.")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None, "Request a stop (as SIGTERM would) at step N.")
flags.mark_flag_as_required("config")


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fault_hooks(kill_at: int | None, stop_at: int | None, kill_delay_ms: float = 0.0) -> TrainerHooks:
    """Hooks that crash the process after step `kill_at` (`kill_delay_ms` later) and request a stop at step
    `stop_at`."""
    hooks = TrainerHooks()

    def faults(info: StepInfo) -> None:
        if info.step == kill_at:
            if kill_delay_ms > 0:
                timer = threading.Timer(kill_delay_ms / 1000, kill)
                timer.daemon = True  # a run that ends first is not killed after it
                timer.start()
            else:
                kill()
        if info.step == stop_at:
            info.request_stop(signal.SIGTERM)

    hooks.add_step_end(faults)
    return hooks


def kill_before_commit(step: int) -> None:
    """Make Orbax's commit of checkpoint `step` (its temporary folder complete) kill the process instead."""
    from orbax.checkpoint._src.path import atomicity

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        finalize = cls.finalize

        async def killing_finalize(self, finalize=finalize, **kwargs):
            if self.get_final().name == str(step):
                kill()
            return await finalize(self, **kwargs)

        cls.finalize = killing_finalize


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if _KILL_COMMIT.value is not None:
        kill_before_commit(_KILL_COMMIT.value)
    run(_CONFIG.value, hooks=fault_hooks(_KILL_AT.value, _STOP_AT.value, _KILL_DELAY.value))


if __name__ == "__main__":
    app.run(main)
