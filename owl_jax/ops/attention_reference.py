"""The reference attention: float32 scores and softmax, probabilities in the value dtype before the second
product (what the released PyTorch code does in half precision).

Without dropout and a KV cache it runs heads-major batched products whose backward pass is written out,
so that every backward product takes operands in the compute dtype (autodiff of a half-precision product
with a float32 result would multiply in float32), and causal attention runs in blocks of `CAUSAL_BLOCK`
queries that skip the masked upper triangle. Attention dropout and reads of the KV cache take the plain
autodiff formulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from owl_jax.config import Numerics
from owl_jax.ops import bits, cpu
from owl_jax.ops.elementwise import dropout
from owl_jax.ops.numerics import cpu_matmul

Array = jax.Array
CAUSAL_BLOCK = 128  # query rows per block of causal attention


def reference_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    mask: Array | None,
    dropout_rate: float,
    dropout_key: Array | None,
    numerics: Numerics,
    heads_major_kv: bool = False,
    is_causal: bool = False,
    causal_block: int | None = None,
) -> Array:
    """`(B, Lq, H, Dh)` queries, `(B, Lk, Hkv, Dh)` keys/values (`(B, Hkv, Lk, Dh)` with `heads_major_kv`),
    optional `(B, Lq, Lk)` boolean mask → `(B, Lq, H, Dh)` in `q.dtype`."""
    if heads_major_kv or (dropout_rate > 0 and dropout_key is not None):
        lk = k.shape[2 if heads_major_kv else 1]
        mask = _with_causal(mask, q.shape[1], lk) if is_causal else mask
        return _autodiff_attention(
            q,
            k,
            v,
            scale=scale,
            mask=mask,
            dropout_rate=dropout_rate,
            dropout_key=dropout_key,
            heads_major_kv=heads_major_kv,
        )
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    groups = h // hkv
    # heads-major operands, batch and heads kept apart (each may be sharded on its own mesh axis):
    qh = q.reshape(b, lq, hkv, groups, dh).transpose(0, 2, 3, 1, 4)  # (B, Hkv, G, Lq, Dh)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, Hkv, Lk, Dh)
    blocks = causal_blocks(lq, causal_block) if is_causal else ((0, lq, k.shape[1], False),)
    out = _attention_core(qh, kh, vh, jnp.ones((), bool) if mask is None else mask, scale, blocks, numerics)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, dh).astype(q.dtype)


def _with_causal(mask: Array | None, lq: int, lk: int) -> Array:
    """`mask` (or no mask) narrowed to keys j <= query i."""
    causal = jnp.tril(jnp.ones((lq, lk), bool))[None]
    return causal if mask is None else mask & causal


def causal_blocks(length: int, block: int | None = None) -> tuple:
    """Query blocks `(start, end, keys, causal)` of causal attention: block i attends to the keys before its
    end only, so the products skip the masked upper triangle block by block (about half their FLOPs for
    many blocks), in blocks of `block` (default `CAUSAL_BLOCK`) queries."""
    block = block or CAUSAL_BLOCK
    if length <= block:
        return ((0, length, length, True),)
    return tuple((s, min(s + block, length), min(s + block, length), True) for s in range(0, length, block))


def _block_probs(qh: Array, kh: Array, mask: Array, scale: float, block: tuple) -> Array:
    """Float32 probabilities `(B, Hkv, G * bq, K)` of one query block against the first K keys."""
    q0, q1, ke, causal = block
    scores = (
        jnp.einsum("bhgqd,bhkd->bhgqk", qh[:, :, :, q0:q1], kh[:, :, :ke], preferred_element_type=jnp.float32) * scale
    )
    if causal:
        rows = jax.lax.broadcasted_iota(jnp.int32, (q1 - q0, ke), 0) + q0
        scores = jnp.where(
            rows >= jax.lax.broadcasted_iota(jnp.int32, (q1 - q0, ke), 1), scores, jnp.finfo(jnp.float32).min
        )
    if mask.ndim:
        scores = jnp.where(mask[:, None, None, q0:q1, :ke], scores, jnp.finfo(jnp.float32).min)
    b, h, g, bq, _ = scores.shape
    return jax.nn.softmax(scores, axis=-1).reshape(b, h, g * bq, ke)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention_core(
    qh: Array, kh: Array, vh: Array, mask: Array, scale: float, blocks: tuple, numerics: Numerics
) -> Array:
    """softmax(q kᵀ · scale, masked) v over heads-major operands, per query block (`causal_blocks`),
    accumulated and returned in float32 `(B, Hkv, G, Lq, Dh)`. On the CPU route the two backward products
    that contract over the query axis read physically transposed copies."""
    return _attention_fwd(qh, kh, vh, mask, scale, blocks, numerics)[0]


def _query_block(x: Array, block: tuple) -> Array:
    """Rows `block` of `(B, Hkv, G, Lq, D)` as `(B, Hkv, G * bq, D)`."""
    b, h, g, _, d = x.shape
    return x[:, :, :, block[0] : block[1]].reshape(b, h, g * (block[1] - block[0]), d)


def _attention_fwd(qh, kh, vh, mask, scale, blocks, numerics):
    b, h, g, _, dh = qh.shape
    probs, outs = [], []
    for block in blocks:
        # The probabilities in the compute dtype: the product below reads them so, and the backward pass
        # keeps them so (half the bytes of float32 for a scan over layers to stack).
        p = _block_probs(qh, kh, mask, scale, block).astype(vh.dtype)
        o = jnp.einsum("bhqk,bhkd->bhqd", p, vh[:, :, : block[2]], preferred_element_type=jnp.float32)
        probs.append(p)
        outs.append(o.reshape(b, h, g, -1, dh))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out, (bits.residuals(numerics, qh, kh, vh, *probs), mask)


def _attention_bwd(scale, blocks, numerics, res, g):
    saved, mask = res
    qh, kh, vh, *probs = bits.from_residuals(saved)
    dt, lk = qh.dtype, kh.shape[2]
    physical = cpu_matmul(numerics)
    swap = cpu.row_major_transpose if physical else (lambda x: jnp.swapaxes(x, -1, -2))
    mm = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)  # noqa: E731
    pad = lambda x: x if x.shape[2] == lk else jnp.pad(x, ((0, 0), (0, 0), (0, lk - x.shape[2]), (0, 0)))  # noqa: E731
    dq, dk, dv = [], 0.0, 0.0
    for block, p in zip(blocks, probs):
        ke = block[2]
        gc, qb = _query_block(g, block).astype(dt), _query_block(qh, block)
        dv = dv + pad(mm("bhkq,bhqd->bhkd", swap(p), gc))
        dp = mm("bhqd,bhkd->bhqk", gc, vh[:, :, :ke])
        # softmax's backward: dS = P * (dP - rowsum(dP * P)); rowsum(dP * P) = rowsum(dO * O), with O the
        # forward's product of these P and V, so the output need not be kept
        p32 = p.astype(jnp.float32)
        ds = (p32 * (dp - jnp.sum(p32 * dp, axis=-1, keepdims=True)) * scale).astype(dt)
        dq.append(mm("bhqk,bhkd->bhqd", ds, kh[:, :, :ke]).astype(dt).reshape(*qh.shape[:3], -1, qh.shape[4]))
        dk = dk + pad(mm("bhkq,bhqd->bhkd", swap(ds), qb))
    dq = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=3)
    return dq, dk.astype(kh.dtype), dv.astype(vh.dtype), None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


def _autodiff_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float,
    mask: Array | None,
    dropout_rate: float,
    dropout_key: Array | None,
    heads_major_kv: bool = False,
) -> Array:
    b, lq, h, dh = q.shape
    hkv = k.shape[1 if heads_major_kv else 2]
    groups = h // hkv
    kv = "bhkd" if heads_major_kv else "bkhd"
    qg = q.reshape(b, lq, hkv, groups, dh)
    scores = jnp.einsum(f"bqhgd,{kv}->bhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_key)
    # (in the dot's own output order, then transposed: XLA's CPU compiler cannot run a half-precision batched
    # product with a float32 result that it lays out transposed, which it did for a `bqhgd` output)
    out = jnp.einsum(f"bhgqk,{kv}->bhgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, dh).astype(q.dtype)
