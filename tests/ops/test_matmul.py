"""`ops.matmul` on both routes: gradients, and the dtype every backward product takes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import all_eqns
from owl_jax import ops
from owl_jax.config import Numerics


@pytest.mark.parametrize("transposed_copies", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_matmul_gradients_in_every_compute_dtype(dtype, transposed_copies):
    """The half-precision matmul (backward in the compute dtype; on the CPU with physically transposed
    operands) has the gradients of the plain matmul, up to rounding the incoming gradient to the compute
    dtype, and in bf16 every backward matmul multiplies bf16 operands (none upcast to float32)."""
    numerics = Numerics(matmul="cpu" if transposed_copies else "xla")  # the CPU's route or accelerators'

    def matmul_f32(x, w, dt):
        return ops.matmul(x, w, dtype=dt, numerics=numerics, out_dtype=jnp.float32)

    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, 24))
    w = jax.random.normal(kw, (24, 40)) * 0.2
    g = jax.random.normal(kg, (3, 5, 40))
    dt = jnp.dtype(dtype)
    ours = jax.grad(lambda x, w: jnp.sum(matmul_f32(x, w, dt) * g), argnums=(0, 1))(x, w)
    xr, wr = x.astype(dt).astype(jnp.float32), w.astype(dt).astype(jnp.float32)  # the values really multiplied
    gr = g.astype(dt).astype(jnp.float32)
    dx, dw = gr @ wr.T, jnp.einsum("bli,blo->io", xr, gr)
    tol = 3e-2 if dtype == "bfloat16" else 1e-5
    assert ours[0].dtype == x.dtype and ours[1].dtype == w.dtype
    np.testing.assert_allclose(ours[0], dx, rtol=tol, atol=tol * np.abs(dx).max())
    np.testing.assert_allclose(ours[1], dw, rtol=tol, atol=tol * np.abs(dw).max())
    np.testing.assert_allclose(matmul_f32(x, w, dt), xr @ wr, rtol=1e-5, atol=1e-4)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(matmul_f32(x, w, dt) * g), argnums=(0, 1)))(x, w)
    operand_dtypes = {
        str(v.aval.dtype) for eqn in all_eqns(jaxpr.jaxpr) if eqn.primitive.name == "dot_general" for v in eqn.invars
    }
    assert operand_dtypes == {dtype}
