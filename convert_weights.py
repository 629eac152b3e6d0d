#!/usr/bin/env python
"""Convert mPLUG-Owl weights: `python convert_weights.py import|export|init ...`.

The same command as `owl-convert`; see `owl_jax/cli/convert.py`.
"""

import sys

from owl_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
