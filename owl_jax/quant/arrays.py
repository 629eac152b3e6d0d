"""A float kernel ↔ its stored integers and scales, through qwix.

`quantize_kernel` calibrates and rounds with `qwix.quantize` (symmetric absmax, per output channel for
int8, per group of inputs for int4) and returns what a `QuantLinear` stores; `dequantize_kernel` rebuilds
the float kernel with `qwix.dequantize` (a `qwix.QArray` over the unpacked integers and their scales).

int4 values are packed two per byte (uint8), along the input axis K, adjacent inputs together: byte
`(k, n)` of the packed array holds input `2k` in its low nibble and `2k + 1` in its high nibble (two's
complement). Unpacking is then local to each row of bytes, so a packed array sharded along K unpacks on
its own shards. (JAX's own `int4` dtype takes a whole byte per value in host and CPU memory.)

All functions take any number of leading axes (stacked layers): kernels are `(..., K, N)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from owl_jax.quant.spec import QuantSpec

Array = jax.Array


def stored_shapes(kernel_shape: tuple[int, ...], spec: QuantSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of `(qvalue, qscale)` for a kernel of `kernel_shape` `(..., K, N)`."""
    *lead, k, n = kernel_shape
    rows = k // 2 if spec.mode == "int4" else k
    return (*lead, rows, n), (*lead, k // spec.group_for(k), n)


def stored_dtypes(spec: QuantSpec) -> tuple[np.dtype, np.dtype]:
    """Dtypes of `(qvalue, qscale)`."""
    return np.dtype(np.int8 if spec.mode == "int8" else np.uint8), np.dtype(jnp.dtype(spec.scale_dtype))


def pack_int4(q: Array) -> Array:
    """`(..., K, N)` integers in [-8, 7] → `(..., K/2, N)` uint8, inputs 2k (low nibble) and 2k+1 (high)."""
    *lead, k, n = q.shape
    nibbles = (q.astype(jnp.int32) & 0xF).reshape(*lead, k // 2, 2, n)
    return (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).astype(jnp.uint8)


def unpack_int4(packed: Array) -> Array:
    """`(..., K/2, N)` uint8 → `(..., K, N)` int8 in [-8, 7] (inverse of `pack_int4`)."""
    *lead, rows, n = packed.shape
    b = packed.astype(jnp.int8)  # the same bits, read as signed
    low = jnp.right_shift(jnp.left_shift(b, 4), 4)  # arithmetic shifts sign-extend each nibble
    high = jnp.right_shift(b, 4)
    return jnp.stack([low, high], axis=-2).reshape(*lead, 2 * rows, n)


def quantize_kernel(kernel: Array, spec: QuantSpec) -> tuple[Array, Array]:
    """`(..., K, N)` float kernel → `(qvalue, qscale)` as `stored_shapes` gives them.

    Calibration runs in float32 whatever the kernel's dtype; the scales are stored in `spec.scale_dtype`.
    """
    w = jnp.asarray(kernel).astype(jnp.float32)
    k_axis = w.ndim - 2
    channels = [a for a in range(w.ndim) if a != k_axis]  # leading (layer) axes and outputs: their own scales
    if spec.mode == "int8":
        q = qwix.quantize(w, jnp.int8, channelwise_axes=channels)
        qvalue = q.qvalue
    else:
        q = qwix.quantize(w, jnp.int4, channelwise_axes=channels, tiled_axes={k_axis: spec.group_for(w.shape[-2])})
        qvalue = pack_int4(q.qvalue)
    return qvalue, q.scale.astype(spec.scale_dtype)


def dequantize_kernel(qvalue: Array, qscale: Array, spec: QuantSpec, dtype) -> Array:
    """`(qvalue, qscale)` → the `(..., K, N)` kernel in `dtype` (products in float32, rounded once)."""
    q = unpack_int4(qvalue) if spec.mode == "int4" else qvalue
    qarray = qwix.QArray(qvalue=q, scale=qscale.astype(jnp.float32), qtype=jnp.int8)
    return qwix.dequantize(qarray).astype(dtype)


def quantize_host(kernel: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """`quantize_kernel` of a host array, one slice of its leading axis at a time (for a stacked kernel the
    float32 temporaries are one layer's), into host arrays."""
    kernel = np.asarray(kernel)
    q_shape, s_shape = stored_shapes(kernel.shape, spec)
    q_dtype, s_dtype = stored_dtypes(spec)
    if kernel.ndim == 2:
        q, s = _quantize_jit(kernel, spec)
        return np.asarray(q), np.asarray(s)
    qvalue, qscale = np.empty(q_shape, q_dtype), np.empty(s_shape, s_dtype)
    for i in range(kernel.shape[0]):
        q, s = quantize_host(kernel[i], spec)
        qvalue[i], qscale[i] = q, s
    return qvalue, qscale


@functools.partial(jax.jit, static_argnums=1)
def _quantize_jit(kernel: Array, spec: QuantSpec) -> tuple[Array, Array]:
    return quantize_kernel(kernel, spec)
