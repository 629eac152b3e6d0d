"""Reading one layer of a stacked tower's parameters."""

from __future__ import annotations

from typing import Any

import jax

from owl_jax.ops.cpu import PreparedKernel


def layer(state: Any, i: int) -> Any:
    """Layer `i` of stacked parameters (prepared kernels held per layer give their own array)."""
    return jax.tree.map(
        lambda a: a.layer(i) if isinstance(a, PreparedKernel) else a[i],
        state,
        is_leaf=lambda a: isinstance(a, PreparedKernel),
    )
