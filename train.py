#!/usr/bin/env python
"""Train mPLUG-Owl: `python train.py [--config configs/<name>.py] [--config.<field>=<value> ...]`.

Without `--config` it runs the embedded default (`configs/default.py`): a small model trained through both
stages on generated data, ending with the held-out accuracy table. Every process of a multi-host run
(TPU pod slice, GPU cluster) runs the same command; see the README.
"""

import os
import sys

from absl import app, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so configs/*.py can import each other

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Training configuration file.", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value.model.scan_layers:  # measured faster with scanned layers only (docs/performance.md)
        from owl_jax.host_memory import reexec_with_huge_pages

        reexec_with_huge_pages()  # reruns this command once, before JAX loads; OWL_JAX_HUGE_PAGES=0 skips it
    logging.set_verbosity(logging.WARNING)  # Orbax reports every save step at INFO
    from owl_jax.training.run import run

    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
