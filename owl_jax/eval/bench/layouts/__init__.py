"""Loaders of the benchmarks' official local file layouts, one module per benchmark, each with `load(data_dir)`.

Each module's docstring shows the folder `--data` points at. Loaders read files only (no model, no JAX)
and fail with one line naming the file, and the field or line, that is missing or wrong.
"""
