"""Ahead-of-time compilation of the training step for named TPU topologies, on any host.

- `targets`: slice names (v5p-256, v5e-256, v4-128, v6e-64, 2xv5e-256, v5e:2x2) → topologies and chip figures;
- `train_plan`: compile a stage's real train step for a target with abstract arrays, and report;
- `search`: the largest per-chip batch that fits, and the remat policy that allows it;
- `analysis`: memory, collectives, matmul FLOPs (loop bodies × trip count) and kernels of a compiled program;
- `cli` (`python -m owl_jax.aot`), and `train.py --config.aot.topology=...`.

Importing this package loads no JAX: the entry points first set up the host (`train_plan.use_cpu_host`).
"""
