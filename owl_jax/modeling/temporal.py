"""The video layout's temporal module: each ViT layer first mixes every patch with the same patch of the
neighbouring frames (`x = x + temporal(x)`), then runs as the image ViT layer on each frame alone.

    patches  (B, T, P, D)
    u = down_proj(ln(patches))                     # LayerNorm eps 1e-5 (not the ViT's); a 1×1×1 Conv3d D → D/2
    y_t = b + w_0·u_(t-1) + w_1·u_t + w_2·u_(t+1)  # depthwise conv over time, kernel 3, zero padding
    out = up_proj(quick_gelu(y))                   # a 1×1×1 Conv3d D/2 → D

The class-token rows come back unchanged, so the layer's residual doubles them. The 1×1×1 convolutions are
per-token linear layers (`Linear`, LoRA-capable); the depthwise one is `TimeConv`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.config import LoRAConfig, Numerics
from owl_jax.modeling.activations import activation
from owl_jax.modeling.linear import Linear, stacked
from owl_jax.modeling.norms import LayerNorm

Array = jax.Array

LAYER_NORM_EPS = 1e-5  # torch's default: the released module builds its LayerNorm without an eps
KERNEL_SIZE = 3
HF_MODULE = "vision_model.encoder.layers.{i}.temporal"
# The released module names inside `temporal` (the converter's key table maps every parameter through them).
HF_MODULES = {name: f"{HF_MODULE}.{name}" for name in ("ln", "down_proj", "conv", "up_proj")}


def time_conv(u: Array, taps: Array, bias: Array) -> Array:
    """Depthwise convolution over time, zero-padded to keep the length, computed in float32.

    Args:
      u: `(B, T, P, C)`.
      taps: `(K, C)` with K odd; tap k weighs frame `t + k - (K - 1)/2`.
      bias: `(C,)`.

    Returns:
      `(B, T, P, C)` in `u`'s dtype.
    """
    k, t = taps.shape[0], u.shape[1]
    half = (k - 1) // 2
    padded = jnp.pad(u.astype(jnp.float32), ((0, 0), (half, half), (0, 0), (0, 0)))
    w = taps.astype(jnp.float32)
    y = sum(padded[:, i : i + t] * w[i] for i in range(k)) + bias.astype(jnp.float32)
    return y.astype(u.dtype)


class TimeConv(nnx.Module):
    """`temporal.conv`: a depthwise Conv3d with kernel `(K, 1, 1)` and padding `((K - 1)/2, 0, 0)`.

    `taps` is `(K, C)` (the released weight `(C, 1, K, 1, 1)` transposed); built with `stack=L` every
    parameter has a leading `layers` axis.
    """

    def __init__(self, channels: int, *, stack: int | None, param_dtype: str, rngs: nnx.Rngs):
        pdt = jnp.dtype(param_dtype)
        shape, axes = stacked(stack, (KERNEL_SIZE, channels), (None, "vision_mlp"))
        # Fresh weights: PyTorch's Conv3d default bound, 1/sqrt(fan_in) with fan_in = K.
        bound = KERNEL_SIZE**-0.5
        self.taps = nnx.Param(jax.random.uniform(rngs.params(), shape, pdt, -bound, bound), axes=axes)
        bshape, baxes = stacked(stack, (channels,), ("vision_mlp",))
        self.bias = nnx.Param(jnp.zeros(bshape, pdt), axes=baxes)

    def __call__(self, u: Array) -> Array:
        """`(B, T, P, C)` → `(B, T, P, C)`."""
        return time_conv(u, self.taps[...], self.bias[...])


class Temporal(nnx.Module):
    """`vision_model.encoder.layers.N.temporal`: frames `(B, T, N, D)` → `(B, T, N, D)`, class rows unchanged."""

    def __init__(
        self,
        hidden_size: int,
        *,
        stack: int | None,
        lora: LoRAConfig | None,
        dtype: str,
        param_dtype: str,
        numerics: Numerics,
        rngs: nnx.Rngs,
    ):
        d, c = hidden_size, hidden_size // 2
        linear = dict(stack=stack, lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs)
        self.numerics = numerics
        self.ln = LayerNorm(d, eps=LAYER_NORM_EPS, stack=stack, param_dtype=param_dtype, numerics=numerics)
        self.down_proj = Linear(d, c, axes=("vision_embed", "vision_mlp"), hf_name=HF_MODULES["down_proj"], **linear)
        self.conv = TimeConv(c, stack=stack, param_dtype=param_dtype, rngs=rngs)
        self.up_proj = Linear(c, d, axes=("vision_mlp", "vision_embed"), hf_name=HF_MODULES["up_proj"], **linear)

    def __call__(self, x: Array, key: Array | None = None) -> Array:
        """`(B, T, N, D)` (row 0 of each frame the class token) → `(B, T, N, D)`; `key` drives LoRA dropout."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        cls, patches = x[:, :, :1], x[:, :, 1:]
        u = self.conv(self.down_proj(self.ln(patches), keys[0]))  # (B, T, P, D/2)
        h = self.up_proj(activation("quick_gelu", u, numerics=self.numerics), keys[1])
        return jnp.concatenate([cls, h.astype(x.dtype)], axis=2)
