"""The CPU routes of `owl_jax.ops`: SwiGLU in float32 and its gradients, prepared kernels as bit patterns
through scans, float32 weight gradients, one-row products, embedding lookups, and layer loops compiled
without hoisting float32 copies of stacked weights."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import OPTIM, one_device_mesh, tiny_batch, tiny_config, tiny_params
from owl_jax import ops
from owl_jax.checkpoint import flatten
from owl_jax.config import LoRAConfig, Numerics
from owl_jax.modeling.activations import swiglu as swiglu_of
from owl_jax.ops.bits import HalfBits
from owl_jax.sharding import use_mesh
from owl_jax.training.run import adapt_params
from owl_jax.training.trainer import Trainer

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU code paths")
CPU = Numerics(matmul="cpu", half_as_bits="on", hoist_invariants="off")


def swiglu(gate, up):
    return swiglu_of(gate, up, numerics=CPU)


def matmul_f32(x, w, dtype):
    return ops.matmul(x, w, dtype=dtype, numerics=CPU, out_dtype=jnp.float32)


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
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2**-8, atol=1e-6)


def _compiled_step(trainer, params) -> tuple[str, dict]:
    state = trainer.init_state(params, seed=0)
    batch = trainer.global_batch(tiny_batch())
    with use_mesh(trainer.mesh):
        return trainer.jitted_step(state, batch).lower(state, batch).compile().as_text(), flatten(state.prepared)


@pytest.mark.parametrize("bits", [True, False])
def test_scanned_bf16_stacks_are_not_converted_to_float32(bits):
    # XLA's CPU compiler slices a bf16 stack through a float32 copy of all of it; as uint16 bits it does not.
    numerics = CPU.replace(half_as_bits="on" if bits else "off", hoist_invariants="on")
    cfg = tiny_config(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0), numerics=numerics, dtype="bfloat16")
    trainer = Trainer(cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    hlo, prepared = _compiled_step(trainer, adapt_params(tiny_params(cfg), cfg, None, seed=0))
    stacks = {tuple(k.w.shape) for p, k in prepared.items() if "layers" in p}
    assert stacks
    assert all(isinstance(k.w, HalfBits) == bits for p, k in prepared.items() if "layers" in p)
    converted = {s for s in stacks if re.search(rf"= f32\[{','.join(map(str, s))}\]\S* (?:convert|fusion)\(", hlo)}
    assert (converted == set()) == bits, converted
    if bits:  # the backward pass reads the transposed stacks the scan was given: no stacked copies of them
        shapes = stacks | {tuple(k.w_t.shape) for p, k in prepared.items() if "layers" in p}
        copied = {
            s
            for s in shapes
            if re.search(rf"= u16\[{','.join(map(str, s))}\]\S* (?:fusion|dynamic-update-slice)\(", hlo)
        }
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
        got = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(x, w, lambda x, w: matmul_f32(x, w, jnp.float32))
        want = jax.grad(loss, (0, 1))(x, w, lambda x, w: jnp.matmul(x, w))
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # a kernel nobody differentiates gets no gradient product: the forward one and the input's only
    jaxpr = jax.make_jaxpr(jax.grad(loss), static_argnums=2)(x, w, lambda x, w: matmul_f32(x, w, jnp.float32))
    assert str(jaxpr).count("dot_general") == 2


def _float32_copies(fn, *args, shape) -> int:
    """How many instructions of the compiled `fn` make a float32 array of `shape` (a whole-operand conversion)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(rf"= f32\[{','.join(map(str, shape))}\]\S* (?:convert|fusion)\(", text))


def test_one_row_bf16_products_and_embedding_lookups_convert_no_weight():
    """Batch-1 decoding: a one-row bf16 product and a bf16 embedding lookup, without a float32 copy of the
    weight or the table (XLA's CPU backend makes one on every call otherwise); same values as before."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(64, 96)), jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(1, 1, 64)), jnp.bfloat16)
    mm = lambda x, w: matmul_f32(x, w, jnp.bfloat16)  # noqa: E731
    assert _float32_copies(mm, x, w, shape=(64, 96)) == 0
    assert (
        _float32_copies(lambda x, w: jnp.matmul(x, w, preferred_element_type=jnp.float32), x, w, shape=(64, 96)) >= 1
    )  # what the one-row path avoids
    want = np.asarray(x, np.float32)[0] @ np.asarray(w, np.float32)  # bf16 products are exact in float32
    np.testing.assert_allclose(np.asarray(mm(x, w))[0], want, rtol=1e-5, atol=1e-5)
    two = jnp.concatenate([x, x + 1], axis=1)
    np.testing.assert_array_equal(np.asarray(mm(two, w))[:, :1], np.asarray(mm(x, w)))  # as in a batch

    table = jnp.asarray(rng.normal(size=(50, 64)), jnp.bfloat16)
    ids = jnp.array([[3, 7, 3]])
    take_rows = lambda t, i: ops.take_rows(t, i, numerics=CPU)  # noqa: E731
    assert _float32_copies(take_rows, table, ids, shape=(50, 64)) == 0
    assert _float32_copies(lambda t, i: jnp.take(t, i, axis=0), table, ids, shape=(50, 64)) >= 1
    np.testing.assert_array_equal(np.asarray(take_rows(table, ids)), np.asarray(table[ids]))
    loss = lambda take: lambda t: (take(t, ids).astype(jnp.float32) ** 2).sum()
    np.testing.assert_array_equal(
        np.asarray(jax.grad(loss(take_rows))(table)),
        np.asarray(jax.grad(loss(lambda t, i: jnp.take(t, i, axis=0)))(table)),
    )


@pytest.mark.parametrize("hoist", ["on", "off"])
def test_scanned_bf16_forward_slices_the_weights_in_the_loop(hoist):
    """A bf16 forward over scanned layers compiled with `ops.compiler_options`: XLA's CPU compiler slices
    bf16 stacks in float32, and with loop-invariant code motion on it converts every whole stack before the
    loop (temporaries of twice the stacked weights); without it, one layer at a time."""
    from flax import nnx

    from owl_jax.modeling import Owl

    cfg = tiny_config(dtype="bfloat16", param_dtype="bfloat16", numerics=CPU.replace(hoist_invariants=hoist))
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, hidden_size=256, intermediate_size=768, num_layers=6))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Owl(cfg, rngs=nnx.Rngs(0))))
    stacked = sum(
        a.size * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state).language_model.layers))
    )

    def forward(state, ids):
        return nnx.merge(graphdef, state).forward(None, ids)

    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    compiled = jax.jit(forward, compiler_options=ops.compiler_options(cfg.numerics)).lower(state, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    if hoist == "on":
        assert temp >= 2 * stacked, (temp, stacked)
    else:
        assert temp < stacked / 2, (temp, stacked)
