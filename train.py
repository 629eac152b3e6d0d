#!/usr/bin/env python
"""Train mPLUG-Owl: `python train.py [--config configs/<name>.py] [--config.<field>=<value> ...] [--huge_pages]`.

Without `--config` it runs the embedded default (`configs/default.py`): a small model trained through both
stages on generated data, ending with the held-out accuracy table. The same command as `owl-train`
(`owl_jax/cli/train.py`).
"""

from owl_jax.cli.train import main

if __name__ == "__main__":
    main()
