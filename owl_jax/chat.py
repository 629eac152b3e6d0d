"""`python -m owl_jax.chat ...` is `owl-chat ...`: chat with a checkpoint in the terminal (owl_jax.cli.chat)."""

import sys

from owl_jax.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
