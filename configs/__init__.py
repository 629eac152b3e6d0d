"""Experiment and model definitions. Each module exposes `get_config()`."""
