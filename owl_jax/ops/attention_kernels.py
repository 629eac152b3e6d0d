"""Fused attention kernels: cuDNN's (GPU) and Pallas splash attention (TPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from owl_jax.sharding import active_mesh, logical_to_spec

Array = jax.Array
CUDNN_MULTIPLE = 8  # cuDNN's training kernels refuse odd lengths (the ViT's 257 tokens): pad to a multiple
SPLASH_BLOCK = 128


def cudnn_attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None, is_causal: bool) -> Array:
    """cuDNN fused attention over `(B, L, H, Dh)` inputs; lengths that are not a multiple of 8 are
    zero-padded, the padding masked out with cuDNN's own sequence lengths (no bias), and the padded query
    rows dropped."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    tp, sp = -(-t // CUDNN_MULTIPLE) * CUDNN_MULTIPLE, -(-s // CUDNN_MULTIPLE) * CUDNN_MULTIPLE
    if mask is not None or (tp == t and sp == s):
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=None if mask is None else mask[:, None],
            scale=scale,
            is_causal=is_causal,
            implementation="cudnn",
        )
        return out.astype(q.dtype)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))  # noqa: E731
    out = jax.nn.dot_product_attention(
        pad(q, tp),
        pad(k, sp),
        pad(v, sp),
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=jnp.full((b,), t, jnp.int32),
        key_value_seq_lengths=jnp.full((b,), s, jnp.int32),
        implementation="cudnn",
    )
    return out[:, :t].astype(q.dtype)


@functools.cache
def cudnn_accepts(q_shape: tuple, k_shape: tuple, dtype: str, is_causal: bool) -> bool:
    """Whether cuDNN takes these shapes forward and backward (its checks run while tracing, so an abstract
    trace of the gradient tells, at no run-time cost)."""

    def loss(q, k, v):
        return cudnn_attention(q, k, v, scale=1.0, mask=None, is_causal=is_causal).astype(jnp.float32).sum()

    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))  # noqa: E731
    try:
        jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), spec(q_shape), spec(k_shape), spec(k_shape))
        return True
    except (NotImplementedError, ValueError, TypeError, RuntimeError):
        return False


def splash_applies(q: Array, k: Array, mask: Array | None, dropout: bool) -> bool:
    return mask is None and not dropout and q.shape[1] % SPLASH_BLOCK == 0 and k.shape[1] % SPLASH_BLOCK == 0


@functools.cache
def _splash_kernel(heads: int, lq: int, lk: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((lq, lk)) if causal else sm.FullMask((lq, lk))
    b = SPLASH_BLOCK
    blocks = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    with jax.ensure_compile_time_eval():  # the kernel's block tables: concrete arrays, reusable across traces
        return sk.make_splash_mha(
            sm.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def splash_attention(q: Array, k: Array, v: Array, *, scale: float, is_causal: bool, interpret: bool) -> Array:
    """Splash attention over `(B, L, H, Dh)` inputs (grouped key/value heads are repeated); under a mesh
    per shard (batch over data × fsdp, heads over tensor) through `shard_map`. `interpret` runs the
    kernel in Pallas' interpret mode (off a TPU; slow, for tests)."""
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)

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
