"""`attention`: multi-head attention with grouped key/value heads, on the implementation
`Numerics.attention` names.

- "xla": the reference (`attention_reference`): float32 scores and softmax.
- "jax": `jax.nn.dot_product_attention` with its default (XLA) implementation.
- "cudnn": cuDNN's fused kernel (GPU, bf16/fp16, no attention dropout).
- "splash": Pallas splash attention, the TPU's fused kernel, wherever it applies (unmasked or causal
  attention without dropout, lengths multiples of 128: LLaMA's causal training pass), the reference
  elsewhere (the ViT's 257 tokens, masks). Off a TPU it runs in Pallas' interpret mode (slow; for tests).
- "auto": splash on a TPU where it applies; cuDNN on a GPU for half-precision inputs without dropout and
  without an explicit mask (unmasked or causal: the ViT, the abstractor and right-padded training rows),
  falling back to the reference, with a warning, where cuDNN refuses the shapes; the reference elsewhere
  (an explicit mask would reach cuDNN as a materialised additive bias, which costs more than it saves).
"""

from __future__ import annotations

import logging

import jax

from owl_jax.config import ATTENTION_IMPLS, Numerics
from owl_jax.ops import attention_kernels as kernels
from owl_jax.ops.attention_bias import biased_attention
from owl_jax.ops.attention_reference import reference_attention
from owl_jax.ops.numerics import is_half, platform

Array = jax.Array
_log = logging.getLogger("owl_jax")


def resolve_implementation(
    implementation: str, dtype, *, dropout: bool, masked: bool = False, lengths: tuple[int, int] | None = None
) -> str:
    """The implementation "auto" stands for with these inputs (others are returned as given)."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLS}")
    if implementation != "auto":
        return implementation
    backend = platform()
    if backend == "gpu" and is_half(dtype) and not dropout and not masked:
        return "cudnn"
    if (
        backend == "tpu"
        and not dropout
        and not masked
        and lengths is not None
        and all(n % kernels.SPLASH_BLOCK == 0 for n in lengths)
    ):
        return "splash"
    return "xla"


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    numerics: Numerics,
    mask: Array | None = None,
    is_causal: bool = False,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
    heads_major_kv: bool = False,
    bias: Array | None = None,
) -> Array:
    """Multi-head attention.

    Args:
      q: `(B, Lq, H, Dh)` queries.
      k, v: `(B, Lk, Hkv, Dh)` keys and values, or `(B, Hkv, Lk, Dh)` with `heads_major_kv` (the KV cache's
        layout, which the reference reads as it is); `H` must be a multiple of `Hkv`.
      scale: multiplier of the scores (`Dh ** -0.5`).
      numerics: `numerics.attention` picks the implementation (see the module docstring).
      mask: optional `(B, Lq, Lk)` boolean, True where a query may attend to a key.
      is_causal: query i attends to keys j <= i only (with `mask`, both apply); needs Lq == Lk.
      dropout_rate, dropout_key: dropout on the attention probabilities (training only).
      bias: optional `(B, H, Lk)` float32 added to every query's scaled scores (BLOOM's ALiBi); attention
        with a bias takes the routes of `attention_bias`.

    Returns:
      `(B, Lq, H, Dh)` in `q.dtype`.
    """
    if bias is not None:
        return biased_attention(
            q,
            k,
            v,
            bias,
            scale=scale,
            numerics=numerics,
            mask=mask,
            is_causal=is_causal,
            dropout_rate=dropout_rate,
            dropout_key=dropout_key,
            heads_major_kv=heads_major_kv,
        )
    implementation = numerics.attention
    dropout_on = dropout_rate > 0 and dropout_key is not None
    reference = dict(
        scale=scale,
        mask=mask,
        dropout_rate=dropout_rate,
        dropout_key=dropout_key,
        numerics=numerics,
        is_causal=is_causal,
    )
    if heads_major_kv:
        if resolve_implementation(implementation, q.dtype, dropout=dropout_on, masked=mask is not None) == "xla":
            return reference_attention(q, k, v, heads_major_kv=True, **reference)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if is_causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys; got {q.shape[1]} and {k.shape[1]}")
    impl = resolve_implementation(
        implementation, q.dtype, dropout=dropout_on, masked=mask is not None, lengths=(q.shape[1], k.shape[1])
    )
    if (
        impl == "cudnn"
        and implementation == "auto"
        and not kernels.cudnn_accepts(q.shape, k.shape, str(q.dtype), is_causal)
    ):
        _log.warning("cuDNN attention refuses q%s k%s; using the XLA path", q.shape, k.shape)
        impl = "xla"
    if impl == "splash" and kernels.splash_applies(q, k, mask, dropout_on):
        return kernels.splash_attention(q, k, v, scale=scale, is_causal=is_causal, interpret=platform() != "tpu")
    if impl in ("xla", "splash"):
        return reference_attention(q, k, v, **reference)
    if dropout_on:
        raise ValueError(f"attention implementation {impl!r} has no attention dropout; use 'xla' or 'auto'")
    if impl == "cudnn":
        if platform() != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs a GPU; this backend is {platform()!r}")
        return kernels.cudnn_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[:, None], scale=scale, is_causal=is_causal
    )
    return out.astype(q.dtype)


__all__ = ["attention", "resolve_implementation"]
