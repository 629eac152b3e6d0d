"""Model parameters as flat leaves: `{path: array}` with `path` a tuple of attribute names inside `Owl`.

Every reader and writer of this package passes parameters in this form (`("language_model", "layers",
"q_proj", "kernel")` is the stacked q-projection kernel of all LLaMA layers). This module converts between
the flat form, nested dicts and `Owl` modules, and gives the shapes and shardings a config implies.

A leaf can also be pending (`PendingLeaf`): its shape and dtype are known but it is read only when
needed, so that a writer can take the leaves one at a time instead of all of them at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from owl_jax.config import OwlConfig
from owl_jax.modeling import Owl
from owl_jax.sharding import state_shardings

Path = tuple[str, ...]
Shapes = dict[Path, tuple[tuple[int, ...], Any]]

# Host buffers start on this boundary, so that a CPU device array can use them without a copy.
_ALIGN = 64


def nest(leaves: dict[Path, Any]) -> dict[str, Any]:
    """`{("a", "b"): x}` → `{"a": {"b": x}}`."""
    tree: dict[str, Any] = {}
    for path, value in leaves.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def flatten(tree: dict[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """`{"a": {"b": x}}` → `{("a", "b"): x}` (inverse of `nest`)."""
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def empty_aligned(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """`np.empty(shape, dtype)` starting on a 64-byte boundary (`jax.device_put` on a CPU then aliases it)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass(eq=False)
class PendingLeaf:
    """A leaf that is read when needed: `materialize()` calls `produce` (once per call; nothing is cached)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def materialize(self) -> np.ndarray:
        array = self.produce()
        if tuple(array.shape) != tuple(self.shape) or np.dtype(array.dtype) != np.dtype(self.dtype):
            raise ValueError(f"pending leaf promised {self.shape} {self.dtype}, produced {array.shape} {array.dtype}")
        return array


def materialize(value: Any) -> Any:
    """The array behind `value` (a `PendingLeaf` is read; anything else is returned as is)."""
    return value.materialize() if isinstance(value, PendingLeaf) else value


def largest_first(leaves: dict[Path, Any]) -> list[Path]:
    """The paths of `leaves` by decreasing size: reading them in this order, the copies made while a leaf
    is read are largest while little else is held."""
    nbytes = lambda p: int(np.prod(leaves[p].shape, dtype=np.int64)) * np.dtype(leaves[p].dtype).itemsize
    return sorted(leaves, key=lambda p: -nbytes(p))


def abstract_model(cfg: OwlConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and shape-only state of `Owl(cfg)` (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Owl(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def _value(var: Any) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var.value


def leaf_shapes(state: Any) -> Shapes:
    """`{path: (shape, dtype)}` of every Variable in an (abstract) `nnx.State`."""
    return {
        tuple(str(p) for p in path): (tuple(_value(var).shape), _value(var).dtype)
        for path, var in nnx.to_flat_state(state)
    }


def flat_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> dict[Path, jax.sharding.Sharding]:
    """`{path: sharding}` of every Variable of `state` on `mesh` (the model's logical axis rules)."""
    flat = nnx.to_flat_state(state_shardings(state, mesh))
    return {tuple(str(p) for p in path): _value(v) for path, v in flat}


def assemble(graphdef: nnx.GraphDef, abstract: nnx.State, leaves: dict[Path, Any]) -> Owl:
    """Put `leaves` (`{path: array}`) into the abstract state and build the module.

    Raises:
      KeyError: naming the parameters `leaves` has no value for.
    """
    flat = []
    missing = []
    for path, var in nnx.to_flat_state(abstract):
        key = tuple(str(p) for p in path)
        if key not in leaves:
            missing.append("/".join(key))
            continue
        flat.append((path, var.replace(leaves[key])))
    if missing:
        raise KeyError(f"no values for parameters {missing[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def host_leaves(model: Owl) -> dict[Path, np.ndarray]:
    """The model's parameters as host numpy arrays, `{path: array}`."""
    return {
        tuple(str(p) for p in path): np.asarray(jax.device_get(_value(var)))
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
