"""Attention math shared by the ViT, the abstractor and LLaMA, and LLaMA's rotary embedding.

`dot_product_attention` runs one of several implementations (`OwlConfig.attention_impl`):

- "xla": the reference path: scores and softmax in float32, probabilities cast to the value dtype before the
  second matmul (what the released PyTorch code does in half precision);
- "jax": `jax.nn.dot_product_attention` with its default (XLA) implementation;
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused attention (GPU, bf16/fp16);
- "auto": "cudnn" on a GPU for half-precision inputs without attention dropout (falling back to "xla", with
  a warning, where cuDNN refuses the shapes), "xla" everywhere else.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from owl_jax.config import ATTENTION_IMPLS
from owl_jax.modeling._layers import dropout

Array = jax.Array


_HALF = (jnp.bfloat16, jnp.float16)
_warned: set[str] = set()


def resolve_implementation(implementation: str, dtype, *, dropout: bool) -> str:
    """The implementation "auto" stands for with these inputs (others are returned as given)."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLS}")
    if implementation != "auto":
        return implementation
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in _HALF and not dropout:
        return "cudnn"
    return "xla"


def dot_product_attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None = None,
                          dropout_rate: float = 0.0, dropout_key: Array | None = None,
                          implementation: str = "xla") -> Array:
    """Multi-head attention with grouped key/value heads.

    Args:
      q: `(B, Lq, H, Dh)` queries.
      k, v: `(B, Lk, Hkv, Dh)` keys and values; `H` must be a multiple of `Hkv`.
      scale: multiplier of the scores (`Dh ** -0.5`).
      mask: optional `(B, Lq, Lk)` boolean, True where a query may attend to a key.
      dropout_rate, dropout_key: dropout on the attention probabilities (training only).

      implementation: see the module docstring.

    Returns:
      `(B, Lq, H, Dh)` in `q.dtype`.
    """
    dropout_on = dropout_rate > 0 and dropout_key is not None
    impl = resolve_implementation(implementation, q.dtype, dropout=dropout_on)
    if impl != "xla":
        if dropout_on:
            raise ValueError(f"attention implementation {impl!r} has no attention dropout; use 'xla' or 'auto'")
        if impl == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs a GPU; this backend is {jax.default_backend()!r}")
        try:
            out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale,
                                               implementation=None if impl == "jax" else "cudnn")
            return out.astype(q.dtype)
        except (NotImplementedError, ValueError, TypeError) as e:
            if implementation != "auto":
                raise
            key = f"{q.shape}{k.shape}{q.dtype}"
            if key not in _warned:
                _warned.add(key)
                logging.getLogger("owl_jax").warning("cuDNN attention refused q%s k%s (%s); using the XLA path",
                                                     q.shape, k.shape, e)
    return _reference_attention(q, k, v, scale=scale, mask=mask, dropout_rate=dropout_rate, dropout_key=dropout_key)


def _reference_attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None,
                         dropout_rate: float, dropout_key: Array | None) -> Array:
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    groups = h // hkv
    qg = q.reshape(b, lq, hkv, groups, dh)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_key)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, h, dh).astype(q.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> Array:
    """`1 / theta^(2i/d)` for i < d/2, in float32 (HF LLaMA's `inv_freq`)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta ** exponents)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding in HF's rotate_half layout (first half of each head pairs with the second).

    Args:
      x: `(B, L, H, Dh)`.
      positions: `(B, L)` integer positions.
    """
    inv_freq = rope_inverse_frequencies(x.shape[-1], theta)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, Dh/2)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
