"""Swapping a model's float `Linear` layers for `QuantLinear`: what `Owl(config)` does when `config.quant` is set.

The model is built float as always and each selected `Linear` (`QuantSpec.selects` on its module path) is
then replaced by its quantized twin in its parent module. Under `nnx.eval_shape` (how the checkpoint code
and the trainer build abstract models) nothing is allocated and the swap only fixes the shapes and dtypes
of `qvalue`/`qscale`; on a concrete model it quantizes the weights held (fine for small models; large ones
are filled from checkpoints or built layer by layer, `owl_jax.quant.random_init`).

Stacked towers keep one module per kernel stack, so a stacked `Linear` becomes one stacked `QuantLinear`
(`qvalue` `(L, K, N)` or packed `(L, K/2, N)`, `qscale` with the same leading axis) and scans over layers
slice it as they slice any other parameter.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from owl_jax.modeling.linear import Linear
from owl_jax.quant.linear import QuantLinear
from owl_jax.quant.spec import QuantSpec

ModulePath = tuple[str, ...]


def selected_linears(model: nnx.Module, spec: QuantSpec) -> list[tuple[ModulePath, Linear]]:
    """`(module path, Linear)` of every float linear layer of `model` that `spec` quantizes."""
    found = []
    for path, node in nnx.iter_graph(model):
        key = tuple(str(p) for p in path)
        if isinstance(node, Linear) and spec.selects(key):
            found.append((key, node))
    return found


def quantize_linears(model: nnx.Module, spec: QuantSpec) -> list[ModulePath]:
    """Replace, in place, every `Linear` of `model` that `spec` selects by a `QuantLinear`; returns their paths."""
    spec.validate()
    chosen = selected_linears(model, spec)
    for path, linear in chosen:
        parent = _module_at(model, path[:-1])
        setattr(parent, path[-1], QuantLinear.from_linear(linear, spec))
    return [p for p, _ in chosen]


def quantized_modules(model: nnx.Module) -> dict[ModulePath, QuantLinear]:
    """`{module path: QuantLinear}` of `model`."""
    return {tuple(str(p) for p in path): node for path, node in nnx.iter_graph(model) if isinstance(node, QuantLinear)}


def _module_at(model: nnx.Module, path: ModulePath) -> Any:
    node: Any = model
    for part in path:
        node = node[int(part)] if isinstance(node, (list, tuple)) else getattr(node, part)
    return node
