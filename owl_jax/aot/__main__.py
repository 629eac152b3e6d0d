"""`python -m owl_jax.aot`: see `owl_jax.aot.cli`."""

import sys

from owl_jax.aot.cli import main

sys.exit(main())
