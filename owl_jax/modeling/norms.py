"""LayerNorm (ViT, abstractor) and RMSNorm (LLaMA), both normalising in float32 as the released model does.

On half-precision inputs each is `ops.recomputed`: the backward pass keeps the half-precision input, not
the float32 intermediates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax import ops
from owl_jax.config import Numerics
from owl_jax.modeling.linear import stacked

Array = jax.Array


def layer_norm(x: Array, scale: Array, bias: Array, *, eps: float) -> Array:
    """`(..., D)` normalised over D in float32, scaled and shifted, returned in `x`'s dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rms_norm(x: Array, scale: Array, *, eps: float, dtype: str) -> Array:
    """LLaMA's RMSNorm of `(..., D)`: normalise in float32, cast to `dtype`, then scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * y.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 and cast back (the released `LayerNormFp32`)."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        stack: int | None = None,
        param_dtype: str = "float32",
        axis_name: str = "norm",
        numerics: Numerics = Numerics(),
    ):
        self.eps = float(eps)
        self.numerics = numerics
        shape, axes = stacked(stack, (features,), (axis_name,))
        self.scale = nnx.Param(jnp.ones(shape, param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype), axes=axes)

    def __call__(self, x: Array) -> Array:
        norm = functools.partial(layer_norm, eps=self.eps)
        args = (x, self.scale[...], self.bias[...])
        return ops.recomputed(norm, *args, numerics=self.numerics) if ops.is_half(x.dtype) else norm(*args)


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm (see `rms_norm`)."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        stack: int | None = None,
        dtype: str = "float32",
        param_dtype: str = "float32",
        numerics: Numerics = Numerics(),
    ):
        self.eps = float(eps)
        self.dtype = dtype
        self.numerics = numerics
        shape, axes = stacked(stack, (features,), ("norm",))
        self.scale = nnx.Param(jnp.ones(shape, param_dtype), axes=axes)

    def __call__(self, x: Array) -> Array:
        norm = functools.partial(rms_norm, eps=self.eps, dtype=self.dtype)
        args = (x, self.scale[...])
        return ops.recomputed(norm, *args, numerics=self.numerics) if ops.is_half(x.dtype) else norm(*args)
