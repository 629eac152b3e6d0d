"""The CPU's half-precision fast paths: SwiGLU in float32 and its gradients, bit patterns through scans, one-row
products and embedding lookups."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.checkpoint.native import flatten
from owl_jax.config import LoRAConfig
from owl_jax.modeling import _layers
from owl_jax.modeling._layers import swiglu
from owl_jax.sharding import use_mesh
from owl_jax.training.run import adapt_params
from owl_jax.training.trainer import Trainer
from test_training_step import OPTIM, one_device_mesh, tiny_batch, tiny_config, tiny_params

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU code paths")


def test_swiglu_matches_float32_autodiff():
    rng = np.random.default_rng(0)
    gate, up = (jnp.asarray(rng.normal(size=(4, 16, 32)) * 3, jnp.bfloat16) for _ in range(2))
    weights = jnp.asarray(rng.integers(-4, 5, size=32), jnp.float32)  # exact in bf16, as is the cotangent
    # the forward computes in float32 and rounds once
    once = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(swiglu(gate, up)), np.asarray(once))
    assert not np.array_equal(np.asarray(once), np.asarray(jax.nn.silu(gate) * up))  # rounding per op differs

    def loss(g, u, f):
        return (f(g, u).astype(jnp.float32) * weights).sum()

    grads = jax.grad(loss, (0, 1))(gate, up, swiglu)
    ref = jax.grad(loss, (0, 1))(gate.astype(jnp.float32), up.astype(jnp.float32), lambda g, u: jax.nn.silu(g) * u)
    for got, want in zip(grads, ref):
        assert got.dtype == jnp.bfloat16
        # float32 math rounded once to bf16: within one bf16 step of the float32 gradient
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2 ** -8, atol=1e-6)


def _compiled_step(trainer, params) -> tuple[str, dict]:
    state = trainer.init_state(params, seed=0)
    batch = trainer.global_batch(tiny_batch())
    with use_mesh(trainer.mesh):
        return trainer.jitted_step(state, batch).lower(state, batch).compile().as_text(), flatten(state.prepared)


@pytest.mark.parametrize("bits", [True, False])
def test_scanned_bf16_stacks_are_not_converted_to_float32(bits, monkeypatch):
    # XLA's CPU backend slices a bf16 stack through a float32 copy of all of it; as uint16 bits it does not.
    monkeypatch.setattr(_layers, "_CPU_SCAN_BITS", bits)
    cfg = tiny_config(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0)).replace(dtype="bfloat16")
    trainer = Trainer(cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    hlo, prepared = _compiled_step(trainer, adapt_params(tiny_params(cfg), cfg, None, seed=0))
    stacks = {tuple(k.w.shape) for p, k in prepared.items() if "layers" in p}
    assert stacks
    assert all((k.bits_of == "bfloat16") == bits for p, k in prepared.items() if "layers" in p)
    converted = {s for s in stacks if re.search(r"= f32\[%s\]\S* (?:convert|fusion)\(" % ",".join(map(str, s)), hlo)}
    assert (converted == set()) == bits, converted
    if bits:  # the backward pass reads the transposed stacks the scan was given: no stacked copies of them
        shapes = stacks | {tuple(k.w_t.shape) for p, k in prepared.items() if "layers" in p}
        copied = {s for s in shapes if re.search(r"= u16\[%s\]\S* (?:fusion|dynamic-update-slice)\(" % ",".join(map(str, s)), hlo)}
        assert not copied, copied


@pytest.mark.parametrize("shape", [(64, 48, 4), (64, 4, 48), (16, 32, 32)])  # narrow output, narrow input, square
def test_float32_matmul_gradients_match_autodiff(shape):
    rows, n_in, n_out = shape
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, rows // 2, n_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, rows // 2, n_out)), jnp.float32)

    def loss(x, w, f):
        return (f(x, w) * weights).sum()

    with jax.default_matmul_precision("highest"):
        got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, lambda x, w: _layers.matmul_f32(x, w, jnp.float32))
        want = jax.grad(loss, (0, 1))(x, w, lambda x, w: jnp.matmul(x, w))
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # a kernel nobody differentiates gets no gradient product: the forward one and the input's only
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=2)(x, w, lambda x, w: _layers.matmul_f32(x, w, jnp.float32))
    assert str(jaxpr).count("dot_general") == 2


def _float32_copies(fn, *args, shape) -> int:
    """How many instructions of the compiled `fn` make a float32 array of `shape` (a whole-operand conversion)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r"= f32\[%s\]\S* (?:convert|fusion)\(" % ",".join(map(str, shape)), text))


def test_one_row_bf16_products_and_embedding_lookups_convert_no_weight():
    """Batch-1 decoding: a one-row bf16 product and a bf16 embedding lookup, without a float32 copy of the
    weight or the table (XLA's CPU backend makes one on every call otherwise); same values as before."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(64, 96)), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(1, 1, 64)), jnp.bfloat16)
    mm = lambda x, w: _layers.matmul_f32(x, w, jnp.bfloat16)
    assert _float32_copies(mm, x, w, shape=(64, 96)) == 0
    assert _float32_copies(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32), x, w,
                           shape=(64, 96)) >= 1  # what the one-row path avoids
    want = np.asarray(x, np.float32)[0] @ np.asarray(w, np.float32)  # bf16 products are exact in float32
    np.testing.assert_allclose(np.asarray(mm(x, w))[0], want, rtol=1e-5, atol=1e-5)
    two = jnp.concatenate([x, x + 1], axis=1)
    np.testing.assert_array_equal(np.asarray(mm(two, w))[:, :1], np.asarray(mm(x, w)))  # as in a batch

    table = jnp.asarray(rng.normal(size=(50, 64)), jnp.bfloat16)
    ids = jnp.array([[3, 7, 3]])
    assert _float32_copies(_layers.take_rows, table, ids, shape=(50, 64)) == 0
    assert _float32_copies(lambda t, i: jnp.take(t, i, axis=0), table, ids, shape=(50, 64)) >= 1
    np.testing.assert_array_equal(np.asarray(_layers.take_rows(table, ids)), np.asarray(table[ids]))
    loss = lambda take: (lambda t: (take(t, ids).astype(jnp.float32) ** 2).sum())
    np.testing.assert_array_equal(np.asarray(jax.grad(loss(_layers.take_rows))(table)),
                                  np.asarray(jax.grad(loss(lambda t, i: jnp.take(t, i, axis=0)))(table)))
