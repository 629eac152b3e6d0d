"""Pallas splash attention (the TPU kernel) against the XLA reference. Off a TPU the kernel runs in Pallas'
interpret mode, so these tests check the same kernel code on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax import ops
from owl_jax.config import Numerics
from owl_jax.ops import resolve_implementation
from owl_jax.sharding import make_mesh, use_mesh

pytestmark = pytest.mark.compile_quickly  # compares two computations compiled alike


def inputs(b=2, length=256, heads=4, kv_heads=4, dh=32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, length, heads, dh), jnp.float32)
    k = jax.random.normal(keys[1], (b, length, kv_heads, dh), jnp.float32)
    v = jax.random.normal(keys[2], (b, length, kv_heads, dh), jnp.float32)
    return q, k, v


def attention_and_grads(impl, q, k, v, causal):
    def f(q, k, v):
        out = ops.attention(q, k, v, scale=q.shape[-1] ** -0.5, is_causal=causal, numerics=Numerics(attention=impl))
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("causal,kv_heads", [(True, 4), (False, 4), (True, 2)])
def test_splash_matches_the_reference_forward_and_backward(causal, kv_heads):
    q, k, v = inputs(kv_heads=kv_heads)
    ref_out, ref_grads = attention_and_grads("xla", q, k, v, causal)
    out, grads = attention_and_grads("splash", q, k, v, causal)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=0)


def test_splash_under_a_mesh_runs_per_shard():
    if jax.device_count() < 4:
        pytest.skip("needs 4 (fake) devices")
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    q, k, v = inputs()
    ref_out, ref_grads = attention_and_grads("xla", q, k, v, True)
    with use_mesh(mesh):
        out, grads = attention_and_grads("splash", q, k, v, True)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=5e-5, rtol=0)


def test_splash_leaves_what_it_cannot_take_to_the_reference():
    """257 tokens (the ViT) and explicit masks run the reference path under "splash"; "auto" picks splash
    only on a TPU."""
    q, k, v = inputs(length=257)
    np.testing.assert_allclose(
        ops.attention(q, k, v, scale=0.2, numerics=Numerics(attention="splash")),
        ops.attention(q, k, v, scale=0.2, numerics=Numerics(attention="xla")),
        atol=1e-6,
    )
    q, k, v = inputs(length=128)
    mask = jnp.ones((2, 128, 128), bool).at[1, :, 100:].set(False)
    np.testing.assert_allclose(
        ops.attention(q, k, v, scale=0.2, mask=mask, numerics=Numerics(attention="splash")),
        ops.attention(q, k, v, scale=0.2, mask=mask, numerics=Numerics(attention="xla")),
        atol=1e-6,
    )
    expected = "splash" if jax.default_backend() == "tpu" else "xla"
    assert resolve_implementation("auto", jnp.float32, dropout=False, lengths=(256, 256)) == expected
    assert resolve_implementation("auto", jnp.float32, dropout=False, lengths=(257, 257)) == "xla"


def test_stage2_steps_with_splash_equal_the_reference():
    """LoRA train steps on 128-token rows: LLaMA's causal attention through splash (the ViT and abstractor
    stay on the reference) gives the reference's losses and parameters."""
    from helpers import OPTIM, assert_same_steps, one_device_mesh, run_steps, tiny_batch, tiny_config, tiny_params
    from owl_jax.config import LoRAConfig
    from owl_jax.training.run import adapt_params
    from owl_jax.training.trainer import Trainer

    runs = []
    for impl in ("xla", "splash"):
        cfg = tiny_config(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0), numerics=Numerics(attention=impl))
        params = adapt_params(tiny_params(cfg), cfg, None, seed=0)
        trainer = Trainer(cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
        runs.append(run_steps(trainer, params, steps=2, batch=lambda i: tiny_batch(length=128, seed=i)))
    assert_same_steps(runs[1], runs[0], atol=1e-5)
