"""Attention with a per-key bias (BLOOM's ALiBi): every route against a float64 formula, and explicit fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax import ops
from owl_jax.config import Numerics
from owl_jax.ops.attention_bias import biased_implementation


def _inputs(b=2, lq=5, lk=7, h=6, hkv=3, dh=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, lq, h, dh)).astype(np.float32)
    k = rng.normal(size=(b, lk, hkv, dh)).astype(np.float32)
    v = rng.normal(size=(b, lk, hkv, dh)).astype(np.float32)
    bias = (3 * rng.normal(size=(b, h, lk))).astype(np.float32)
    mask = np.tril(np.ones((lq, lk), bool), k=lk - lq)[None] & (np.arange(lk) >= np.array([[0], [2]]))[:, None]
    return q, k, v, bias, mask


def _float64(q, k, v, bias, mask, scale):
    q, k, v, bias, mask = (
        np.asarray(a, np.float64) if a.dtype != bool else np.asarray(a) for a in (q, k, v, bias, mask)
    )
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) * scale + bias[:, :, None, :]
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def _attend(impl: str, **static):
    """`ops.attention` with a bias on `impl`, compiled (one program instead of one per operation)."""
    numerics = Numerics(attention=impl)
    return jax.jit(
        lambda q, k, v, bias, mask=None: ops.attention(q, k, v, bias=bias, mask=mask, numerics=numerics, **static)
    )


@pytest.mark.parametrize("impl", ["xla", "jax", "auto", "splash"])
def test_biased_attention_matches_the_formula(impl):
    q, k, v, bias, mask = _inputs()
    expected = _float64(q, k, v, bias, mask, 8**-0.5)
    np.testing.assert_allclose(_attend(impl, scale=8**-0.5)(q, k, v, bias, mask), expected, atol=2e-5, rtol=0)
    # the KV cache's heads-major layout reads the same
    heads_major = _attend(impl, scale=8**-0.5, heads_major_kv=True)
    out = heads_major(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias, mask)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=0)


def test_causal_biased_attention_and_its_gradient():
    q, k, v, bias, _ = _inputs(lq=7, lk=7)
    causal = np.tril(np.ones((7, 7), bool))[None].repeat(2, 0)
    attend = _attend("xla", scale=0.5, is_causal=True)
    np.testing.assert_allclose(attend(q, k, v, bias), _float64(q, k, v, bias, causal, 0.5), atol=2e-5, rtol=0)
    grad = jax.jit(jax.grad(lambda q: attend(q, k, v, bias).sum()))(q)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


def test_routes_without_a_bias_fall_back_explicitly():
    assert [biased_implementation(i) for i in ("auto", "xla", "jax", "cudnn", "splash")] == [
        "xla",
        "xla",
        "jax",
        "cudnn",
        "xla",
    ]
    q, k, v, bias, mask = _inputs()
    with pytest.raises(ValueError, match="not one of"):
        ops.attention(q, k, v, scale=1.0, bias=bias, numerics=Numerics(attention="flash"))
    with pytest.raises(ValueError, match=r"attention bias \(2, 6, 5\) does not fit"):
        ops.attention(q, k, v, scale=1.0, bias=bias[:, :, :5], numerics=Numerics(attention="xla"))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            ops.attention(q, k, v, scale=1.0, bias=bias, mask=mask, numerics=Numerics(attention="cudnn"))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_takes_the_bias():
    q, k, v, bias, mask = _inputs(b=2, lq=64, lk=64, h=8, hkv=8, dh=64)
    half = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    expected = _float64(*half, bias, mask, 0.125)
    out = ops.attention(*half, scale=0.125, mask=mask, bias=bias, numerics=Numerics(attention="cudnn"))
    err = np.linalg.norm(np.asarray(out, np.float64) - expected) / np.linalg.norm(expected)
    assert err < 1e-2
