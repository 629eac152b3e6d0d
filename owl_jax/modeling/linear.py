"""The LoRA-capable linear layer, and which layers get adapters."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax import ops
from owl_jax.config import LoRAConfig, Numerics

Array = jax.Array


def stacked(stack: int | None, shape: Sequence[int], axes: Sequence[str | None]):
    """Shape and logical axes of a parameter, with a leading `layers` axis of size `stack` when given."""
    if stack is None:
        return tuple(shape), tuple(axes)
    return (stack, *shape), ("layers", *axes)


def lora_targeted(lora: LoRAConfig | None, hf_name: str, stack: int | None) -> bool:
    """Whether the linear layer called `hf_name` (with `{i}` for the layer index) gets an adapter.

    Stacked layers share one set of modules, so the adapter must target every layer or none.
    """
    if lora is None:
        return False
    names = [hf_name.format(i=i) for i in range(stack)] if stack else [hf_name]
    hits = [lora.matches(n) for n in names]
    if any(hits) and not all(hits):
        chosen = [n for n, h in zip(names, hits) if h]
        raise ValueError(
            f"LoRA target_modules {lora.target_modules!r} select only some layers ({chosen[:3]}...) "
            f"of a stacked tower; adapters must cover all layers of {hf_name!r} or none"
        )
    return all(hits)


class AdaptedProduct(nnx.Module):
    """The forward pass shared by linear layers: `x W`, then the optional bias and low-rank adapter.

    A subclass holds `bias`, `lora_a`, `lora_b`, `lora_scale`, `lora_dropout`, `dtype` and `numerics`,
    and defines `product(x, out_dtype)`: `x W` for however it stores `W`.
    """

    def product(self, x: Array, out_dtype) -> Array:
        raise NotImplementedError

    def set_adapter(self, lora: tuple[nnx.LoRAParam, nnx.LoRAParam, float, float] | None) -> None:
        """Attach `(lora_a, lora_b, scale, dropout)`, or no adapter for None."""
        if lora is None:
            self.lora_a = self.lora_b = None
            self.lora_scale = self.lora_dropout = 0.0
        else:
            self.lora_a, self.lora_b, self.lora_scale, self.lora_dropout = lora

    def __call__(self, x: Array, dropout_key: Array | None = None, *, float32_output: bool = False) -> Array:
        """`(..., in)` → `(..., out)` in the compute dtype (float32 with `float32_output`)."""
        if self.bias is None and self.lora_a is None and not float32_output:
            return self.product(x, self.dtype)
        y = self.product(x, jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora_a is not None:
            mm = dict(dtype=self.dtype, numerics=self.numerics)
            h = ops.matmul(ops.dropout(x, self.lora_dropout, dropout_key), self.lora_a[...], **mm)
            y = y + self.lora_scale * ops.matmul(h, self.lora_b[...], out_dtype=jnp.float32, **mm)
        return y if float32_output else y.astype(self.dtype)


class Linear(AdaptedProduct):
    """`y = x W + b`, with an optional low-rank adapter: `+ scale · dropout(x) A B`.

    `kernel` is `(in, out)` (the transpose of PyTorch's Linear weight); `lora_a` is `(in, r)`, `lora_b`
    `(r, out)`. `hf_name` is the module's name in the released code (with `{i}` for the layer index): peft
    attaches adapters where `lora.matches(hf_name)`. Built with `stack=L`, every parameter has a leading
    `layers` axis of size L.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        hf_name: str,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        stack: int | None = None,
        lora: LoRAConfig | None = None,
        dtype: str = "float32",
        param_dtype: str = "float32",
        numerics: Numerics = Numerics(),
        init_std: float | None = None,
    ):
        self.hf_name = hf_name
        self.dtype = dtype
        self.numerics = numerics
        pdt = jnp.dtype(param_dtype)
        shape, kaxes = stacked(stack, (in_features, out_features), axes)
        # Fresh weights: LeCun normal (std 1/sqrt(fan_in)), which keeps activations O(1) at any width; the
        # released 0.02 is about that for 1024-wide layers but starves narrow ones. Imports overwrite it.
        std = in_features**-0.5 if init_std is None else init_std
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), shape, pdt), axes=kaxes)
        if use_bias:
            bshape, baxes = stacked(stack, (out_features,), axes[1:])
            self.bias = nnx.Param(jnp.zeros(bshape, pdt), axes=baxes)
        else:
            self.bias = None
        if not lora_targeted(lora, hf_name, stack):
            self.set_adapter(None)
        else:
            ashape, aaxes = stacked(stack, (in_features, lora.rank), (axes[0], "lora_rank"))
            bshape, baxes = stacked(stack, (lora.rank, out_features), ("lora_rank", axes[1]))
            bound = in_features**-0.5  # peft's kaiming_uniform(a=sqrt(5)) on A; B starts at zero
            a = nnx.LoRAParam(jax.random.uniform(rngs.params(), ashape, pdt, -bound, bound), axes=aaxes)
            b = nnx.LoRAParam(jnp.zeros(bshape, pdt), axes=baxes)
            self.set_adapter((a, b, float(lora.scale), float(lora.dropout)))

    def product(self, x: Array, out_dtype) -> Array:
        """`(..., in) @ kernel` → `(..., out)` in `out_dtype`."""
        return ops.matmul(x, self.kernel[...], dtype=self.dtype, numerics=self.numerics, out_dtype=out_dtype)
