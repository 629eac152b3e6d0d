"""Activation functions of the three towers."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from owl_jax import ops
from owl_jax.config import Numerics

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    # BLOOM's tanh GELU, with its literal constants (sqrt(2/pi) rounded to 0.79788456), in its order
    "bloom_gelu": lambda x: x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
}


def _silu_mul(gate: Array, up: Array) -> Array:
    return jax.nn.silu(gate) * up


def swiglu(gate: Array, up: Array, *, numerics: Numerics) -> Array:
    """`silu(gate) * up`, same shapes in and out (LLaMA's MLP and the abstractor's)."""
    return ops.elementwise(_silu_mul, gate, up, numerics=numerics)


def activation(name: str, x: Array, *, numerics: Numerics) -> Array:
    """The activation `name` (a key of `ACTIVATIONS`) applied to `x`."""
    return ops.elementwise(ACTIVATIONS[name], x, numerics=numerics)
