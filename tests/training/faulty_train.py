"""Training with injected faults, for the crash and preemption tests: `owl-train`'s `--config` flags plus

    --kill_at_step N   SIGKILL this process right after step N's checkpoint save has started (an asynchronous
                       save may still be in flight), as a crash would
    --stop_at_step N   stop at step N as if a preemption notice (SIGTERM) had arrived during it

Both act through the training loop's hooks (`owl_jax.training.hooks`), in every stage that reaches step N.
"""

import os
import signal

from absl import app, flags, logging
from ml_collections import config_flags

from owl_jax.training.hooks import StepInfo, TrainerHooks
from owl_jax.training.run import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_KILL_AT = flags.DEFINE_integer("kill_at_step", None, "SIGKILL this process after step N's save has started.")
_STOP_AT = flags.DEFINE_integer("stop_at_step", None, "Request a stop (as SIGTERM would) at step N.")
flags.mark_flag_as_required("config")


def fault_hooks(kill_at: int | None, stop_at: int | None) -> TrainerHooks:
    """Hooks that crash the process after step `kill_at` and request a stop at step `stop_at`."""
    hooks = TrainerHooks()

    def faults(info: StepInfo) -> None:
        if info.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if info.step == stop_at:
            info.request_stop(signal.SIGTERM)

    hooks.add_step_end(faults)
    return hooks


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    run(_CONFIG.value, hooks=fault_hooks(_KILL_AT.value, _STOP_AT.value))


if __name__ == "__main__":
    app.run(main)
