"""`python -m owl_jax.eval.bench`: run a standard benchmark (see `owl_jax.eval.bench.cli`)."""

import sys

from owl_jax.eval.bench.cli import main

sys.exit(main())
