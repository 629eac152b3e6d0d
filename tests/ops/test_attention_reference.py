"""The reference attention's written-out backward and its causal query blocks against plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import subjaxprs
from owl_jax import ops
from owl_jax.config import Numerics
from owl_jax.ops import attention_reference as reference
from owl_jax.training.flops import jaxpr_matmul_flops

pytestmark = pytest.mark.compile_quickly  # compares two computations compiled alike


def _inputs(b, lq, lk, h, hkv, d, masked, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, lk, hkv, d)), jnp.float32)
    mask = None
    if masked:  # random holes, every query keeping its first key
        mask = jnp.asarray(rng.random((b, lq, lk)) > 0.3).at[:, :, 0].set(True)
    weights = jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32)
    return q, k, v, mask, weights


CASES = [  # (B, Lq, Lk, H, Hkv, Dh, causal, masked, causal block)
    (2, 7, 7, 4, 2, 8, True, False, 3),  # three blocks, the last one short; two query heads per key head
    (3, 6, 6, 6, 2, 4, True, True, 2),  # causal blocks and a padding mask together
    (2, 13, 13, 3, 3, 8, True, True, None),  # one block (shorter than the default)
    (2, 5, 9, 4, 4, 8, False, True, None),  # cross attention with a mask
    (2, 5, 9, 4, 1, 8, False, False, None),  # one key/value head for all
]


@pytest.mark.parametrize("transposed_copies", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_autodiff(case, transposed_copies):
    b, lq, lk, h, hkv, d, causal, masked, block = case
    numerics = Numerics(attention="xla", matmul="cpu" if transposed_copies else "xla")
    q, k, v, mask, weights = _inputs(b, lq, lk, h, hkv, d, masked)
    full_mask = reference._with_causal(mask, lq, lk) if causal else mask

    def written(q, k, v):
        return reference.reference_attention(
            q,
            k,
            v,
            scale=0.3,
            mask=mask,
            dropout_rate=0.0,
            dropout_key=None,
            numerics=numerics,
            is_causal=causal,
            causal_block=block,
        )

    def plain(q, k, v):
        return reference._autodiff_attention(q, k, v, scale=0.3, mask=full_mask, dropout_rate=0.0, dropout_key=None)

    with jax.default_matmul_precision("highest"):  # float32 products everywhere (GPUs default to TF32)
        np.testing.assert_allclose(jax.jit(written)(q, k, v), plain(q, k, v), atol=2e-6, rtol=0)
        grads = jax.jit(jax.grad(lambda *a: (written(*a) * weights).sum(), argnums=(0, 1, 2)))(q, k, v)
        expected = jax.grad(lambda *a: (plain(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, atol=5e-6, rtol=0)


def _dots(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for sub in subjaxprs(eqn):
            yield from _dots(sub)


@pytest.mark.parametrize("transposed_copies", [True, False])
def test_half_precision_backward_multiplies_in_half_precision(transposed_copies):
    numerics = Numerics(attention="xla", matmul="cpu" if transposed_copies else "xla")
    q, k, v, _, _ = _inputs(2, 8, 8, 4, 2, 8, masked=False)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))

    def loss(q, k, v):
        out = ops.attention(q, k, v, scale=0.3, is_causal=True, numerics=numerics)
        return out.astype(jnp.float32).sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    dots = list(_dots(jaxpr))
    assert len(dots) == 6  # two forward products, four backward
    for eqn in dots:
        assert [x.aval.dtype for x in eqn.invars] == [jnp.bfloat16] * 2, eqn


def test_causal_blocks_skip_the_masked_products():
    assert reference.causal_blocks(300, 128) == ((0, 128, 128, True), (128, 256, 256, True), (256, 300, 300, True))
    assert reference.causal_blocks(100, 128) == ((0, 100, 100, True),)
    q, k, v, _, _ = _inputs(1, 512, 512, 2, 2, 8, masked=False)

    def forward(q, k, v):
        return ops.attention(q, k, v, scale=0.3, is_causal=True, numerics=Numerics(attention="xla"))

    full = 2 * 2 * 2 * 512 * 512 * 8  # both products over every (query, key) pair, 2 heads, 2 FLOPs a MAC
    assert jaxpr_matmul_flops(jax.make_jaxpr(forward)(q, k, v)) == full * (1 + 2 + 3 + 4) / 16  # 10 of 16
