"""`matmul`: every product of a weight in the model, on the route `Numerics.matmul` names.

Inputs are cast to the compute dtype and accumulated in float32. Every product that runs inside a custom rule
or kernel is named `WEIGHT_MATMUL` (`jax.ad_checkpoint.checkpoint_name`), so the remat policies that keep
matmul outputs keep these too: a policy sees only `dot_general`s, not the products inside them.

In half precision the backward pass multiplies in the compute dtype too, the output's cotangent cast back
first, as under `torch.autocast` (JAX's own rule for a half-precision dot with a float32 output multiplies
float32 × float32, with every weight upcast). On the "xla" route half-precision results are written in the
compute dtype straight from the float32 accumulators; on the "cpu" route they are float32 and cast after
(`owl_jax.ops.cpu`). In float32 this is a plain matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from owl_jax.config import Numerics
from owl_jax.ops import bits, cpu
from owl_jax.ops.numerics import cpu_matmul, is_half

Array = jax.Array
WEIGHT_MATMUL = "weight_matmul"  # the name remat policies save (owl_jax.modeling._stack)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _half_matmul(x: Array, w: Array, numerics: Numerics, out_dtype: str) -> Array:
    if cpu_matmul(numerics):
        return cpu.one_row_as_two(x, w, jnp.dtype(out_dtype))
    return jnp.matmul(x, w, preferred_element_type=jnp.dtype(out_dtype))


def _half_matmul_fwd(x, w, numerics: Numerics, out_dtype: str):
    # (symbolic zeros: each gradient needs only the other operand, so a frozen kernel's product keeps no `x`)
    res = bits.residuals(numerics, x.value if w.perturbed else None, w.value if x.perturbed else None)
    return _half_matmul(x.value, w.value, numerics, out_dtype), res


def _half_matmul_bwd(numerics: Numerics, out_dtype: str, res, g: Array):
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    x, w = bits.from_residuals(res)
    dtype = (w if x is None else x).dtype
    g = g.astype(dtype)  # the cotangent back in the compute dtype (as under torch.autocast)
    if cpu_matmul(numerics):
        return cpu.transposed_backward(g, x, w, dtype)
    dx = None if w is None else jnp.matmul(g, w.T, preferred_element_type=dtype)
    dw = None if x is None else jnp.matmul(x.T, g, preferred_element_type=dtype)
    return dx, dw


_half_matmul.defvjp(_half_matmul_fwd, _half_matmul_bwd, symbolic_zeros=True)


def matmul(x: Array, w, *, dtype, numerics: Numerics, out_dtype=None) -> Array:
    """`x @ w`: `(..., K) @ (K, N)` → `(..., N)` in `out_dtype` (default `dtype`), inputs in `dtype`,
    accumulated in float32. `w` may be a `cpu.PreparedKernel`."""
    dtype = jnp.dtype(dtype)
    out_dtype = dtype if out_dtype is None else jnp.dtype(out_dtype)
    lead = x.shape[:-1]
    if isinstance(w, cpu.PreparedKernel):
        if w.dtype == dtype and is_half(dtype) and cpu_matmul(numerics):
            y = cpu.prepared_matmul(x.astype(dtype).reshape(-1, x.shape[-1]), w.w, w.w_t, "float32")
            return checkpoint_name(y.reshape(*lead, w.shape[-1]).astype(out_dtype), WEIGHT_MATMUL)
        w = w.plain()  # prepared for another dtype or route: the plain path
    x, w = x.astype(dtype), w.astype(dtype)
    if is_half(dtype):
        acc = jnp.dtype(jnp.float32) if cpu_matmul(numerics) else out_dtype
        y = _half_matmul(x.reshape(-1, x.shape[-1]), w, numerics, acc.name)
        return checkpoint_name(y.reshape(*lead, w.shape[-1]).astype(out_dtype), WEIGHT_MATMUL)
    if dtype == jnp.float32 and w.ndim == 2 and cpu_matmul(numerics):
        y = cpu.cpu_f32_matmul(x.reshape(-1, x.shape[-1]), w)
        return checkpoint_name(y.reshape(*lead, w.shape[-1]).astype(out_dtype), WEIGHT_MATMUL)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(out_dtype)
