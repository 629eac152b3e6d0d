"""`QuantLinear`: a `Linear` whose kernel is held as integers and scales, dequantized in the forward pass.

It is made from a float `owl_jax.modeling.linear.Linear` (`from_linear`) and takes its place in the model
(`owl_jax.quant.modules`). The module holds `qvalue` and `qscale` instead of `kernel` (no float copy of the
weights), with the kernel's logical axes, so the sharding rules place them as the kernel would be placed:
`qvalue` exactly like the kernel (int4's packed input axis keeps the input's name), `qscale` with the
output axis's name and, for int4 groups, the input axis's name on its group axis (None for int8's single
row). Bias and LoRA adapters stay float and behave as in `Linear`: over a quantized base the adapters are
QLoRA's, trained while the integers stay frozen (`owl_jax.training.optimizer.trainable`).

The forward pass dequantizes the kernel (`owl_jax.quant.arrays.dequantize_kernel`, inside the compiled
program, one layer at a time in a scanned tower) and multiplies through `ops.matmul`, so every matmul
route of `Numerics` applies as for a float kernel; the backward pass dequantizes again from the integers
rather than keeping the float kernel (`owl_jax.quant.matmul`), and no gradient flows to the integers or
scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.modeling.linear import AdaptedProduct, Linear
from owl_jax.quant.arrays import dequantize_kernel, quantize_kernel
from owl_jax.quant.matmul import quant_matmul
from owl_jax.quant.spec import QuantSpec

Array = jax.Array


def scale_axes(kernel_axes: tuple[str | None, ...], spec: QuantSpec) -> tuple[str | None, ...]:
    """Logical axes of `qscale` for a kernel with `kernel_axes` `(..., in, out)`."""
    *lead, k_axis, n_axis = kernel_axes
    return (*lead, k_axis if spec.mode == "int4" else None, n_axis)


class QuantLinear(AdaptedProduct):
    """`y = x dequant(qvalue, qscale) + b (+ LoRA)`: `(..., in)` → `(..., out)`; see the module docstring."""

    def __init__(
        self,
        qvalue: Array,
        qscale: Array,
        *,
        spec: QuantSpec,
        axes: tuple[str | None, ...],
        hf_name: str,
        dtype: str,
        numerics,
        bias: nnx.Param | None = None,
        lora: tuple[nnx.LoRAParam, nnx.LoRAParam, float, float] | None = None,
    ):
        self.hf_name, self.dtype, self.numerics, self.spec = hf_name, dtype, numerics, spec
        self.qvalue = nnx.Param(qvalue, axes=tuple(axes))
        self.qscale = nnx.Param(qscale, axes=scale_axes(tuple(axes), spec))
        self.bias = bias
        self.set_adapter(lora)

    @classmethod
    def from_linear(cls, linear: Linear, spec: QuantSpec) -> QuantLinear:
        """The quantized twin of `linear` (its kernel quantized; bias and adapters kept as they are)."""
        axes = linear.kernel.get_metadata().get("axes")
        qvalue, qscale = quantize_kernel(linear.kernel[...], spec)
        lora = None
        if linear.lora_a is not None:
            lora = (linear.lora_a, linear.lora_b, linear.lora_scale, linear.lora_dropout)
        return cls(
            qvalue,
            qscale,
            spec=spec,
            axes=axes,
            hf_name=linear.hf_name,
            dtype=linear.dtype,
            numerics=linear.numerics,
            bias=linear.bias,
            lora=lora,
        )

    def kernel(self, dtype=None) -> Array:
        """The dequantized kernel `(..., in, out)` in `dtype` (default: the compute dtype)."""
        return dequantize_kernel(self.qvalue[...], self.qscale[...], self.spec, dtype or self.dtype)

    def product(self, x: Array, out_dtype) -> Array:
        """`(..., in) @ dequant(qvalue, qscale)` → `(..., out)` in `out_dtype`."""
        dtype, out = jnp.dtype(self.dtype).name, jnp.dtype(out_dtype).name
        return quant_matmul(x, self.qvalue[...], self.qscale[...], self.spec, dtype, self.numerics, out)
