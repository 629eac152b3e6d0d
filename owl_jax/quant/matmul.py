"""`quant_matmul`: `x @ dequant(qvalue, qscale)` whose backward pass keeps the integers, not the float kernel.

Differentiated as a plain product, the dequantized kernel would be a residual of the forward pass, and a
scan over layers stacks residuals: training adapters over a quantized tower (QLoRA) would hold a float
copy of every layer's kernels, the very memory quantization saves. Here the backward pass gets the
integers and scales as they came in (slices of the scanned stacks, which a scan forwards instead of
copying) and dequantizes them again to compute `dx = g · Wᵀ`; the kernel itself gets no gradient.

Forward products take `ops.matmul`'s route (the model's `Numerics`); the backward product multiplies in
the compute dtype with the cotangent cast back first, as `ops.matmul`'s half-precision rule does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from owl_jax import ops
from owl_jax.config import Numerics
from owl_jax.quant.arrays import dequantize_kernel
from owl_jax.quant.spec import QuantSpec

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def quant_matmul(
    x: Array, qvalue: Array, qscale: Array, spec: QuantSpec, dtype: str, numerics: Numerics, out_dtype: str
) -> Array:
    """`(..., K) @ dequant((K or K/2, N), (G, N))` → `(..., N)` in `out_dtype`, inputs in `dtype`."""
    w = dequantize_kernel(qvalue, qscale, spec, dtype)
    return ops.matmul(x, w, dtype=dtype, numerics=numerics, out_dtype=out_dtype)


def _fwd(x, qvalue, qscale, spec, dtype, numerics, out_dtype):
    y = quant_matmul(x, qvalue, qscale, spec, dtype, numerics, out_dtype)
    return y, (qvalue, qscale, jnp.zeros((0,), x.dtype))


def _bwd(spec, dtype, numerics, out_dtype, res, g):
    qvalue, qscale, like = res
    w = dequantize_kernel(qvalue, qscale, spec, dtype)
    dx = jnp.matmul(g.astype(dtype), jnp.swapaxes(w, -1, -2), preferred_element_type=jnp.float32)
    return dx.astype(like.dtype), None, None


quant_matmul.defvjp(_fwd, _bwd)
