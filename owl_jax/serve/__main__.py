"""`python -m owl_jax.serve`: the same command as `owl-serve` (`owl_jax.cli.serve`)."""

import sys

from owl_jax.cli.serve import main

sys.exit(main())
