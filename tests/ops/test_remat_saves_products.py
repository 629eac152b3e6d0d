"""The remat policies that keep matmul outputs keep the products `ops.matmul` computes inside custom rules."""

import contextlib
import io

import jax
import jax.numpy as jnp
import pytest

from owl_jax import ops
from owl_jax.config import Numerics
from owl_jax.modeling._stack import REMAT_POLICIES


def _saved(policy, dtype) -> str:
    def layer(x, w1, w2):
        h = jax.nn.silu(ops.matmul(x, w1, dtype=dtype, numerics=Numerics()))
        return ops.matmul(h, w2, dtype=dtype, numerics=Numerics()).astype(jnp.float32).sum()

    x, w1, w2 = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((16, 8))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(layer, policy=policy), x, w1, w2)
    return out.getvalue()


@pytest.mark.parametrize("name", ["dots", "dots_with_no_batch_dims"])
def test_half_precision_products_are_kept(name):
    # In half precision the product runs inside a custom VJP, which a dot-based policy alone cannot see:
    # without its name the whole layer would run again in the backward pass.
    assert "[4,16] named 'weight_matmul'" in _saved(REMAT_POLICIES[name], jnp.bfloat16)
    assert "[4,16]" not in _saved(jax.checkpoint_policies.dots_saveable, jnp.bfloat16)
