"""Command-line entry points, one module per command: argument parsing and a call into the library.

    owl-train    owl_jax.cli.train    train from a config file (also `python train.py`)
    owl-convert  owl_jax.cli.convert  convert weights to and from the released PyTorch layout
                                      (also `python convert_weights.py`)
    owl-chat     owl_jax.cli.chat     chat with a checkpoint in the terminal
    owl-serve    owl_jax.cli.serve    OpenAI-compatible HTTP server and chat page
    owl-eval     owl_jax.cli.eval     OwlEval: `owl-eval answer` writes answers, `owl-eval judge` grades them
    owl-prepare  owl_jax.cli.prepare  turn a data source into ArrayRecord shards

Each also runs as `python -m owl_jax.cli.<module>`. Nothing in the library imports this package.
"""
