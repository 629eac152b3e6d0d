"""Half-precision arrays carried as their uint16 bit patterns.

XLA's CPU compiler has no bfloat16 or float16 dynamic-slice, dynamic-update-slice or gather: it wraps
each in conversions to float32 and back. Inside a `lax.scan` over layers the conversion of a stacked
operand is loop-invariant, so it is hoisted out of the loop: a float32 copy of every stacked weight (and
of every stacked residual) is made before the first layer runs. Reinterpreting the same 16 bits as
uint16 costs nothing, and integers are sliced as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from owl_jax.config import Numerics
from owl_jax.ops.numerics import half_as_bits, is_half

Array = jax.Array


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class HalfBits:
    """A bf16/fp16 array held as uint16 (`bits`, same shape) with the dtype it reads back as."""

    bits: Array
    dtype: str

    def tree_flatten(self):
        return (self.bits,), self.dtype

    @classmethod
    def tree_unflatten(cls, dtype, children):
        return cls(children[0], dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.bits.shape

    def value(self) -> Array:
        return jax.lax.bitcast_convert_type(self.bits, jnp.dtype(self.dtype))


def to_bits(a: Any, numerics: Numerics) -> Any:
    """`a` as `HalfBits` where `numerics` moves its dtype as bits; anything else unchanged."""
    if isinstance(a, jax.Array) and half_as_bits(numerics, a.dtype):
        return HalfBits(jax.lax.bitcast_convert_type(a, jnp.uint16), jnp.dtype(a.dtype).name)
    return a


def from_bits(a: Any) -> Any:
    """Undo `to_bits` (the identity on anything but `HalfBits`)."""
    return a.value() if isinstance(a, HalfBits) else a


def is_bits(a: Any) -> bool:
    return isinstance(a, HalfBits)


def residuals(numerics: Numerics, *arrays: Array | None) -> tuple:
    """Residuals of a custom VJP, half-precision ones as bits (a scan over layers stacks residuals);
    None (nothing kept) stays None."""
    return tuple(None if a is None else to_bits(a, numerics) for a in arrays)


def from_residuals(res: tuple) -> tuple:
    return tuple(from_bits(r) for r in res)


__all__ = ["HalfBits", "from_bits", "from_residuals", "is_bits", "is_half", "residuals", "to_bits"]
