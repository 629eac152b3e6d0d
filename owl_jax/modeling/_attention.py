"""Attention math shared by the ViT, the abstractor and LLaMA, and LLaMA's rotary embedding.

`dot_product_attention` is the XLA reference path: scores and softmax in float32, probabilities cast to
the value dtype before the second matmul (what the released PyTorch code does in half precision).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from owl_jax.modeling._layers import dropout

Array = jax.Array


def dot_product_attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None = None,
                          dropout_rate: float = 0.0, dropout_key: Array | None = None) -> Array:
    """Multi-head attention with grouped key/value heads.

    Args:
      q: `(B, Lq, H, Dh)` queries.
      k, v: `(B, Lk, Hkv, Dh)` keys and values; `H` must be a multiple of `Hkv`.
      scale: multiplier of the scores (`Dh ** -0.5`).
      mask: optional `(B, Lq, Lk)` boolean, True where a query may attend to a key.
      dropout_rate, dropout_key: dropout on the attention probabilities (training only).

    Returns:
      `(B, Lq, H, Dh)` in `q.dtype`.
    """
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
