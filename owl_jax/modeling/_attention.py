"""Attention math shared by the ViT, the abstractor and LLaMA, and LLaMA's rotary embedding.

`dot_product_attention` runs one of several implementations (`OwlConfig.attention_impl`):

- "xla": the reference path: scores and softmax in float32, probabilities cast to the value dtype before the
  second matmul (what the released PyTorch code does in half precision); heads-major batched products with
  a written-out backward in the compute dtype, causal attention in blocks of `CAUSAL_BLOCK` queries that
  skip the masked products (attention dropout and reads of the KV cache keep the plain formulation);
- "jax": `jax.nn.dot_product_attention` with its default (XLA) implementation;
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused attention (GPU, bf16/fp16);
- "splash": Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the TPU's fused
  kernel, wherever it applies (unmasked or causal attention without dropout, lengths multiples of 128:
  LLaMA's causal training pass), the "xla" path elsewhere (the ViT's 257 tokens, masks); under a mesh it
  runs per shard (batch over data × fsdp, heads over tensor) through `shard_map`. Off a TPU it runs in
  Pallas' interpret mode (slow; for tests);
- "auto": splash on a TPU where it applies (unmasked or causal, no dropout, lengths multiples of 128);
  "cudnn" on a GPU for half-precision inputs without attention dropout and without an explicit mask
  (unmasked or causal attention: the ViT, the abstractor and right-padded training sequences), falling back to
  "xla", with a warning, where cuDNN refuses the shapes; "xla" everywhere else (an explicit mask would reach
  cuDNN as a materialised additive bias, which costs more than it saves).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from owl_jax.config import ATTENTION_IMPLS
from owl_jax.modeling import _layers
from owl_jax.modeling._layers import dropout

Array = jax.Array


_HALF = (jnp.bfloat16, jnp.float16)
_warned: set[str] = set()


def resolve_implementation(implementation: str, dtype, *, dropout: bool, masked: bool = False,
                           lengths: tuple[int, int] | None = None) -> str:
    """The implementation "auto" stands for with these inputs (others are returned as given)."""
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in _HALF and not dropout and not masked:
        return "cudnn"
    if (backend == "tpu" and not dropout and not masked and lengths is not None
            and all(n % SPLASH_BLOCK == 0 for n in lengths)):
        return "splash"
    return "xla"


def dot_product_attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None = None,
                          is_causal: bool = False, dropout_rate: float = 0.0, dropout_key: Array | None = None,
                          implementation: str = "xla", heads_major_kv: bool = False) -> Array:
    """Multi-head attention with grouped key/value heads.

    Args:
      q: `(B, Lq, H, Dh)` queries.
      k, v: `(B, Lk, Hkv, Dh)` keys and values, or `(B, Hkv, Lk, Dh)` with `heads_major_kv` (the KV
        cache's layout: the reference path's batched matmuls read it as it is, where the other layout
        makes XLA transpose every key and value first); `H` must be a multiple of `Hkv`.
      scale: multiplier of the scores (`Dh ** -0.5`).
      mask: optional `(B, Lq, Lk)` boolean, True where a query may attend to a key.
      is_causal: query i attends to keys j <= i only (with `mask`, both apply); needs Lq == Lk.
      dropout_rate, dropout_key: dropout on the attention probabilities (training only).

      implementation: see the module docstring.

    Returns:
      `(B, Lq, H, Dh)` in `q.dtype`.
    """
    dropout_on = dropout_rate > 0 and dropout_key is not None
    if heads_major_kv:
        if implementation == "xla" or resolve_implementation(implementation, q.dtype, dropout=dropout_on,
                                                             masked=mask is not None) == "xla":
            return _reference_attention(q, k, v, scale=scale, mask=mask, dropout_rate=dropout_rate,
                                        dropout_key=dropout_key, heads_major_kv=True, is_causal=is_causal)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if is_causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs as many queries as keys; got {q.shape[1]} and {k.shape[1]}")
    impl = resolve_implementation(implementation, q.dtype, dropout=dropout_on, masked=mask is not None,
                                  lengths=(q.shape[1], k.shape[1]))
    if impl == "cudnn" and implementation == "auto" and not _cudnn_accepts(q.shape, k.shape, str(q.dtype), is_causal):
        key = f"{q.shape}{k.shape}{q.dtype}"
        if key not in _warned:
            _warned.add(key)
            logging.getLogger("owl_jax").warning("cuDNN attention refuses q%s k%s; using the XLA path", q.shape, k.shape)
        impl = "xla"
    if impl == "splash" and _splash_applies(q, k, mask, dropout_on):
        return _splash_attention(q, k, v, scale=scale, is_causal=is_causal)
    if impl not in ("xla", "splash"):
        if dropout_on:
            raise ValueError(f"attention implementation {impl!r} has no attention dropout; use 'xla' or 'auto'")
        if impl == "cudnn":
            if jax.default_backend() != "gpu":
                raise ValueError(f"attention implementation 'cudnn' needs a GPU; this backend is {jax.default_backend()!r}")
            return _cudnn_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal)
        out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale,
                                           is_causal=is_causal)
        return out.astype(q.dtype)
    return _reference_attention(q, k, v, scale=scale, mask=mask, dropout_rate=dropout_rate, dropout_key=dropout_key,
                                is_causal=is_causal)


def _with_causal(mask: Array | None, lq: int, lk: int) -> Array:
    """`mask` (or no mask) narrowed to keys j <= query i."""
    causal = jnp.tril(jnp.ones((lq, lk), bool))[None]
    return causal if mask is None else mask & causal


_CUDNN_MULTIPLE = 8  # cuDNN's training kernels refuse odd lengths (the ViT's 257 tokens): pad to a multiple


def _cudnn_attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None, is_causal: bool) -> Array:
    """cuDNN fused attention; lengths that are not a multiple of 8 are zero-padded, the padding masked out
    with cuDNN's own sequence lengths (no bias), and the padded query rows dropped."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    tp, sp = -(-t // _CUDNN_MULTIPLE) * _CUDNN_MULTIPLE, -(-s // _CUDNN_MULTIPLE) * _CUDNN_MULTIPLE
    if mask is not None or (tp == t and sp == s):
        out = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale,
                                           is_causal=is_causal, implementation="cudnn")
        return out.astype(q.dtype)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    out = jax.nn.dot_product_attention(pad(q, tp), pad(k, sp), pad(v, sp), scale=scale, is_causal=is_causal,
                                       query_seq_lengths=jnp.full((b,), t, jnp.int32),
                                       key_value_seq_lengths=jnp.full((b,), s, jnp.int32), implementation="cudnn")
    return out[:, :t].astype(q.dtype)


@functools.lru_cache(maxsize=None)
def _cudnn_accepts(q_shape: tuple, k_shape: tuple, dtype: str, is_causal: bool) -> bool:
    """Whether cuDNN takes these shapes forward and backward (its checks run while tracing, so an abstract
    trace of the gradient tells, at no run-time cost)."""
    def loss(q, k, v):
        return _cudnn_attention(q, k, v, scale=1.0, mask=None, is_causal=is_causal).astype(jnp.float32).sum()

    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))  # noqa: E731
    try:
        jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), spec(q_shape), spec(k_shape), spec(k_shape))
        return True
    except (NotImplementedError, ValueError, TypeError, RuntimeError):
        return False


SPLASH_BLOCK = 128


def _splash_applies(q: Array, k: Array, mask: Array | None, dropout: bool) -> bool:
    return mask is None and not dropout and q.shape[1] % SPLASH_BLOCK == 0 and k.shape[1] % SPLASH_BLOCK == 0


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, lq: int, lk: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((lq, lk)) if causal else sm.FullMask((lq, lk))
    b = SPLASH_BLOCK
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                           block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():  # the kernel's block tables: concrete arrays, reusable across traces
        return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _splash_attention(q: Array, k: Array, v: Array, *, scale: float, is_causal: bool) -> Array:
    """Splash attention over `(B, L, H, Dh)` inputs (grouped key/value heads are repeated)."""
    from owl_jax.sharding import active_mesh, logical_to_spec

    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    interpret = jax.default_backend() != "tpu"

    def local(q, k, v):
        kernel = _splash_kernel(q.shape[2], q.shape[1], k.shape[1], is_causal, interpret)
        heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v))
        return heads_first(out).astype(q.dtype)

    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return local(q, k, v)
    spec = logical_to_spec(("batch", None, "act_heads", None), q.shape, mesh)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _reference_attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None,
                         dropout_rate: float, dropout_key: Array | None, heads_major_kv: bool = False,
                         is_causal: bool = False, causal_block: int | None = None) -> Array:
    if heads_major_kv or (dropout_rate > 0 and dropout_key is not None):
        lk = k.shape[2 if heads_major_kv else 1]
        mask = _with_causal(mask, q.shape[1], lk) if is_causal else mask
        return _autodiff_attention(q, k, v, scale=scale, mask=mask, dropout_rate=dropout_rate,
                                   dropout_key=dropout_key, heads_major_kv=heads_major_kv)
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    groups = h // hkv
    # heads-major operands, batch and heads kept apart (each may be sharded on its own mesh axis):
    # (B, Hkv, G, Lq, Dh) queries, (B, Hkv, Lk, Dh) keys and values
    qh = q.reshape(b, lq, hkv, groups, dh).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    blocks = _causal_blocks(lq, causal_block) if is_causal else ((0, lq, k.shape[1], False),)
    out = _attention_core(qh, kh, vh, jnp.ones((), bool) if mask is None else mask, scale, blocks,
                          _layers._cpu_matmul_path())
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, dh).astype(q.dtype)


CAUSAL_BLOCK = 128  # query rows per block of the reference path's causal attention


def _causal_blocks(length: int, block: int | None = None) -> tuple:
    """Query blocks `(start, end, keys, causal)` of causal attention: block i attends to the keys before its
    end only, so the products skip the masked upper triangle block by block (about half their FLOPs for
    many blocks), in blocks of `block` (default 128) queries."""
    block = block or CAUSAL_BLOCK
    if length <= block:
        return ((0, length, length, True),)
    return tuple((s, min(s + block, length), min(s + block, length), True) for s in range(0, length, block))


def _block_probs(qh: Array, kh: Array, mask: Array, scale: float, block: tuple) -> Array:
    """Float32 probabilities `(B, Hkv, G * bq, K)` of one query block against the first K keys."""
    q0, q1, ke, causal = block
    scores = jnp.einsum("bhgqd,bhkd->bhgqk", qh[:, :, :, q0:q1], kh[:, :, :ke],
                        preferred_element_type=jnp.float32) * scale
    if causal:
        rows = jax.lax.broadcasted_iota(jnp.int32, (q1 - q0, ke), 0) + q0
        scores = jnp.where(rows >= jax.lax.broadcasted_iota(jnp.int32, (q1 - q0, ke), 1), scores,
                           jnp.finfo(jnp.float32).min)
    if mask.ndim:
        scores = jnp.where(mask[:, None, None, q0:q1, :ke], scores, jnp.finfo(jnp.float32).min)
    b, h, g, bq, _ = scores.shape
    return jax.nn.softmax(scores, axis=-1).reshape(b, h, g * bq, ke)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention_core(qh: Array, kh: Array, vh: Array, mask: Array, scale: float, blocks: tuple, cpu: bool) -> Array:
    """softmax(q k^T * scale, masked) v over heads-major operands, per query block (`_causal_blocks`),
    accumulated and returned in float32 `(B, Hkv, G, Lq, Dh)`. Its backward is written out: the products of
    the backward pass take operands in the compute dtype (autodiff of a half-precision product with a float32
    result would multiply in float32), and on the CPU the two that contract over the query axis read
    physically transposed copies (XLA's CPU GEMMs run a folded transpose several times slower)."""
    return _attention_fwd(qh, kh, vh, mask, scale, blocks, cpu)[0]


def _query_block(x: Array, block: tuple) -> Array:
    """Rows `block` of `(B, Hkv, G, Lq, D)` as `(B, Hkv, G * bq, D)`."""
    b, h, g, _, d = x.shape
    return x[:, :, :, block[0]:block[1]].reshape(b, h, g * (block[1] - block[0]), d)


def _attention_fwd(qh, kh, vh, mask, scale, blocks, cpu):
    b, h, g, _, dh = qh.shape
    probs, outs = [], []
    for block in blocks:
        # The probabilities in the compute dtype: the product below reads them so, and the backward pass
        # keeps them so (half the bytes of float32 for a scan over layers to stack).
        p = _block_probs(qh, kh, mask, scale, block).astype(vh.dtype)
        o = jnp.einsum("bhqk,bhkd->bhqd", p, vh[:, :, :block[2]], preferred_element_type=jnp.float32)
        probs.append(p)
        outs.append(o.reshape(b, h, g, -1, dh))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    # Half-precision residuals kept as bit patterns: a scan over layers stacks them.
    return out, (_layers.bits_residuals(qh, kh, vh, *probs), mask)


def _swap_last(x: Array, physical: bool) -> Array:
    """`x` with its last two axes swapped; with `physical`, as a real copy (`_layers._row_major_transpose`)."""
    return _layers._row_major_transpose(x) if physical else jnp.swapaxes(x, -1, -2)


def _attention_bwd(scale, blocks, cpu, res, g):
    bits, mask = res
    qh, kh, vh, *probs = _layers.from_bits_residuals(bits)
    dt, lk = qh.dtype, kh.shape[2]
    mm = lambda spec, a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)  # noqa: E731
    pad = lambda x: x if x.shape[2] == lk else jnp.pad(x, ((0, 0), (0, 0), (0, lk - x.shape[2]), (0, 0)))  # noqa: E731
    dq, dk, dv = [], 0.0, 0.0
    for block, p in zip(blocks, probs):
        ke = block[2]
        gc, qb = _query_block(g, block).astype(dt), _query_block(qh, block)
        dv = dv + pad(mm("bhkq,bhqd->bhkd", _swap_last(p, cpu), gc))
        dp = mm("bhqd,bhkd->bhqk", gc, vh[:, :, :ke])
        # softmax's backward: dS = P * (dP - rowsum(dP * P)); rowsum(dP * P) = rowsum(dO * O), with O the
        # forward's product of these P and V, so the output need not be kept
        p32 = p.astype(jnp.float32)
        ds = (p32 * (dp - jnp.sum(p32 * dp, axis=-1, keepdims=True)) * scale).astype(dt)
        dq.append(mm("bhqk,bhkd->bhqd", ds, kh[:, :, :ke]).astype(dt).reshape(*qh.shape[:3], -1, qh.shape[4]))
        dk = dk + pad(mm("bhkq,bhqd->bhkd", _swap_last(ds, cpu), qb))
    dq = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=3)
    return dq, dk.astype(kh.dtype), dv.astype(vh.dtype), None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


def _autodiff_attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None,
                        dropout_rate: float, dropout_key: Array | None, heads_major_kv: bool = False) -> Array:
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
    # (in the dot's own output order, then transposed: XLA's CPU backend cannot run a half-precision batched
    # product with a float32 result that it lays out transposed, which it did for a `bqhgd` output)
    out = jnp.einsum(f"bhgqk,{kv}->bhgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, dh).astype(q.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> Array:
    """`1 / theta^(2i/d)` for i < d/2, in float32 (HF LLaMA's `inv_freq`)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta ** exponents)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding in HF's rotate_half layout (first half of each head pairs with the second), computed
    in float32 and rounded once to `x`'s dtype (HF rounds the half-precision cos/sin and each product).

    Args:
      x: `(B, L, H, Dh)`.
      positions: `(B, L)` integer positions.
    """
    inv_freq = rope_inverse_frequencies(x.shape[-1], theta)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, Dh/2)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2

    def rotate(x: Array) -> Array:
        return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

    return _layers.in_float32(rotate, x)
