"""Quantizing a float model's flat leaves (`{path: array}`, `owl_jax.checkpoint.leaves`) one kernel at a time.

Loading, importing and training all hold parameters as flat leaves. `quantize_leaves` turns the leaves
of `Owl(cfg)` without quantization into those of `Owl(cfg)` with `cfg.quant`: each selected
`(..., "kernel")` becomes `(..., "qvalue")` and `(..., "qscale")`, the rest pass through. Leaves are
consumed largest first, each read (a `PendingLeaf` is read only now), quantized one layer slice at a time
on the host (`arrays.quantize_host`) and handed to `finalize` (e.g. placed on its device shards) before the
next is read, so the float weights are never all held unless the caller holds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from owl_jax.checkpoint.leaves import Path, abstract_model, largest_first, leaf_shapes, materialize
from owl_jax.config import OwlConfig
from owl_jax.quant.arrays import quantize_host
from owl_jax.quant.spec import QSCALE, QUANT_LEAVES, QVALUE, QuantSpec

Finalize = Callable[[Path, np.ndarray], Any]


def quantized_kernels(cfg: OwlConfig) -> set[Path]:
    """Module paths (e.g. `("language_model", "layers", "q_proj")`) whose kernels `cfg.quant` quantizes."""
    if cfg.quant is None:
        return set()
    return {p[:-1] for p in leaf_shapes(abstract_model(cfg)[1]) if p[-1] == QVALUE}


def is_quantized(leaves: dict[Path, Any]) -> bool:
    """Whether `leaves` hold quantized kernels."""
    return any(p[-1] in QUANT_LEAVES for p in leaves)


def quantize_leaves(
    leaves: dict[Path, Any],
    cfg: OwlConfig,
    *,
    finalize: Finalize | None = None,
    on_leaf: Callable[[Path], None] | None = None,
) -> dict[Path, Any]:
    """The leaves of `Owl(cfg)` (with `cfg.quant`) from float `leaves` of the same model unquantized.

    Args:
      leaves: `{path: array | PendingLeaf}`; consumed: each entry is removed once it has been used, so a
        caller that passes its only reference frees every float kernel as soon as it is quantized. Leaves
        already quantized (a quantized checkpoint) pass through.
      cfg: the model config, `cfg.quant` set.
      finalize: `(path, host array) -> leaf` applied to every output leaf (default: keep the host array).
      on_leaf: called with each input path once it is done (progress).

    Returns:
      `{path: leaf}` with `qvalue`/`qscale` in place of each selected kernel.
    """
    spec: QuantSpec | None = cfg.quant
    if spec is None:
        raise ValueError("quantize_leaves needs a config with quant set")
    finalize = finalize or (lambda path, leaf: leaf)
    targets = quantized_kernels(cfg)
    out: dict[Path, Any] = {}
    for path in largest_first(leaves):
        leaf = materialize(leaves.pop(path))
        module = path[:-1]
        if path[-1] == "kernel" and module in targets:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise ValueError(f"{'/'.join(path)}: cannot quantize a kernel of dtype {leaf.dtype}")
            qvalue, qscale = quantize_host(np.asarray(leaf), spec)
            del leaf
            out[module + (QVALUE,)] = finalize(module + (QVALUE,), qvalue)
            out[module + (QSCALE,)] = finalize(module + (QSCALE,), qscale)
        else:
            out[path] = finalize(path, leaf)
        if on_leaf is not None:
            on_leaf(path)
    return out
