"""Attention with an additive per-key bias (BLOOM's ALiBi), on the implementation `Numerics.attention` names.

The bias is one float32 value per batch row, query head and key, added to the scaled scores of every query
before masking: `softmax(q·k · scale + bias[b, h, key], masked)`.

- "xla" (the reference): float32 scores, bias and softmax; probabilities in the value dtype before the
  second product, as the released PyTorch code does.
- "jax": `jax.nn.dot_product_attention` with the bias (its XLA implementation).
- "cudnn": the same call on cuDNN's fused kernel (GPU, bf16/fp16, no attention dropout).
- "splash" and "auto": the reference. Splash attention takes no bias; "auto" keeps the reference as it does
  for explicit masks (a materialised bias costs a fused kernel more than it saves).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from owl_jax.config import ATTENTION_IMPLS, Numerics
from owl_jax.ops.elementwise import dropout
from owl_jax.ops.numerics import platform

Array = jax.Array

# What each implementation becomes with a bias: those that cannot take one run the reference.
BIASED_ROUTES = {"auto": "xla", "xla": "xla", "splash": "xla", "jax": "jax", "cudnn": "cudnn"}


def biased_implementation(implementation: str) -> str:
    """The route attention with a bias takes for `Numerics.attention == implementation`."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLS}")
    return BIASED_ROUTES[implementation]


def biased_attention(
    q: Array,
    k: Array,
    v: Array,
    bias: Array,
    *,
    scale: float,
    numerics: Numerics,
    mask: Array | None = None,
    is_causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    heads_major_kv: bool = False,
) -> Array:
    """Multi-head attention whose scores get `bias` added per key.

    Args:
      q: `(B, Lq, H, Dh)` queries.
      k, v: `(B, Lk, Hkv, Dh)`, or `(B, Hkv, Lk, Dh)` with `heads_major_kv` (the KV cache's layout).
      bias: `(B, H, Lk)` float32, added to every query's scores (after `scale`).
      mask: optional `(B, Lq, Lk)` boolean, True where a query may attend to a key.
      is_causal: query i attends to keys j <= i only (with `mask`, both apply); needs Lq == Lk.

    Returns:
      `(B, Lq, H, Dh)` in `q.dtype`.
    """
    route = biased_implementation(numerics.attention)
    b, lq, h, _ = q.shape
    lk = k.shape[2 if heads_major_kv else 1]
    if bias.shape != (b, h, lk):
        raise ValueError(f"attention bias {bias.shape} does not fit queries {q.shape} and keys {k.shape}")
    if is_causal:
        if lq != lk:
            raise ValueError(f"causal attention needs as many queries as keys; got {lq} and {lk}")
        causal = jnp.tril(jnp.ones((lq, lk), bool))[None]
        mask = causal if mask is None else mask & causal
    dropout_on = dropout_rate > 0 and dropout_key is not None
    if route == "xla":  # reads the KV cache's layout as it is
        kv = "bhkd" if heads_major_kv else "bkhd"
        return _reference(q, k, v, bias, kv, scale=scale, mask=mask, dropout_rate=dropout_rate, dropout_key=dropout_key)
    if heads_major_kv:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if dropout_on:
        raise ValueError(f"attention implementation {route!r} has no attention dropout; use 'xla' or 'auto'")
    if route == "cudnn" and platform() != "gpu":
        raise ValueError(f"attention implementation 'cudnn' needs a GPU; this backend is {platform()!r}")
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias[:, :, None, :].astype(q.dtype),
        mask=None if mask is None else mask[:, None],
        scale=scale,
        implementation="cudnn" if route == "cudnn" else None,
    )
    return out.astype(q.dtype)


def _reference(
    q: Array,
    k: Array,
    v: Array,
    bias: Array,
    kv: str,
    *,
    scale: float,
    mask: Array | None,
    dropout_rate: float,
    dropout_key: Array | None,
) -> Array:
    """Float32 scores plus bias, masked with float32's most negative value, float32 softmax; `kv` is the
    einsum layout of the keys and values ("bkhd", or the cache's "bhkd")."""
    b, lq, h, dh = q.shape
    hkv = k.shape[kv.index("h")]
    groups = h // hkv
    qg = q.reshape(b, lq, hkv, groups, dh)
    scores = jnp.einsum(f"bqhgd,{kv}->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    scores = scores + bias.astype(jnp.float32).reshape(b, hkv, groups, 1, -1)
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
    # (the product in its own output order, then transposed: see `attention_reference._autodiff_attention`)
    out = jnp.einsum(f"bhgqk,{kv}->bhgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, dh).astype(q.dtype)
