"""`owl-train` (or `python train.py`): train mPLUG-Owl from a config file.

    owl-train [--config configs/<name>.py] [--config.<field>=<value> ...] [--huge_pages]

Without `--config` it runs the embedded default (`configs/default.py`): a small model trained through both
stages on generated data, ending with the held-out accuracy table. Every process of a multi-host run
(TPU pod slice, GPU cluster) runs the same command; see the README.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import configs

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "default.py"),
    "Training configuration file.",
    lock_config=True,
)
_HUGE_PAGES = flags.DEFINE_bool(
    "huge_pages",
    False,
    "CPU backend only: run again with glibc's malloc on transparent huge pages, which cuts page faults of "
    "the step's temporaries (measured faster with scanned layers; see owl_jax/cli/host_memory.py).",
)


def _train(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _HUGE_PAGES.value:
        from owl_jax.cli.host_memory import reexec_with_huge_pages

        note = reexec_with_huge_pages()  # returns only where it does not apply, or in the re-run process
        if note:
            print(f"--huge_pages: not applied: {note}", file=sys.stderr)
    logging.set_verbosity(logging.WARNING)  # Orbax reports every save step at INFO
    from owl_jax.training.run import run

    run(_CONFIG.value)


def main() -> None:
    """Parse the command line (absl flags, `--config.<field>` overrides) and train; exits with the status."""
    # absl's --help shows the docstring and key flags of the script that was run: for the `owl-train` and
    # `train.py` wrappers, this module's.
    for name in ("config", "huge_pages"):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
    main_module = sys.modules["__main__"]
    if not main_module.__doc__:
        main_module.__doc__ = __doc__
    app.run(_train)


if __name__ == "__main__":
    main()
