"""cuDNN fused attention against the XLA reference, where a GPU is present (skipped elsewhere).

Run on a GPU machine with `JAX_PLATFORMS=cuda python -m pytest -q tests/ops/test_attention_cudnn.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax import ops
from owl_jax.config import Numerics
from owl_jax.ops import resolve_implementation

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# (B, Lq, Lk, H, Dh, causal): LLaMA training (causal), the ViT (257 tokens, no mask), the abstractor's
# queries over image tokens + queries (cross attention).
CASES = [(2, 512, 512, 8, 128, True), (3, 257, 257, 16, 64, False), (2, 64, 321, 16, 64, False)]


@pytest.mark.parametrize("b,lq,lk,h,dh,causal", CASES)
def test_cudnn_matches_the_reference_forward_and_backward(b, lq, lk, h, dh, causal):
    keys = jax.random.split(jax.random.key(lq * 7 + lk), 4)
    q = jax.random.normal(keys[0], (b, lq, h, dh), jnp.float32)
    k = jax.random.normal(keys[1], (b, lk, h, dh), jnp.float32)
    v = jax.random.normal(keys[2], (b, lk, h, dh), jnp.float32)
    cot = jax.random.normal(keys[3], (b, lq, h, dh), jnp.float32)

    def run(impl, dtype):
        def f(q, k, v):
            out = ops.attention(
                q.astype(dtype),
                k.astype(dtype),
                v.astype(dtype),
                scale=dh**-0.5,
                is_causal=causal,
                numerics=Numerics(attention=impl),
            )
            return jnp.sum(out.astype(jnp.float32) * cot), out

        (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    ref_out, ref_grads = run("xla", jnp.float32)
    out, grads = run("cudnn", jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref_out) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 2e-2
    # "auto" picks cuDNN for these unmasked half-precision inputs.
    assert resolve_implementation("auto", jnp.bfloat16, dropout=False) == "cudnn"
    assert resolve_implementation("auto", jnp.bfloat16, dropout=False, masked=True) == "xla"


def test_fixture_model_loss_is_the_same_with_cudnn(reference, loss_mask):
    """The fixture model in bf16 on its right-padded rows: the loss of the causal pass through cuDNN (LLaMA,
    ViT and abstractor) equals the XLA path's within bf16 rounding, and both stay near the fp32 reference."""
    from helpers import load_fixture_model
    from owl_jax.modeling import masked_next_token_loss

    assert (np.diff(reference["attention_mask"], axis=1) <= 0).all()
    losses = {}
    for impl in ("xla", "cudnn"):
        model = load_fixture_model("checkpoint", dtype="bfloat16", attention_impl=impl)
        logits = jax.jit(lambda p, i, m: model.forward(p, i, m, right_padded=True))(
            jnp.asarray(reference["pixel_values"]),
            jnp.asarray(reference["input_ids"]),
            jnp.asarray(reference["attention_mask"]),
        )
        losses[impl] = float(masked_next_token_loss(logits, reference["input_ids"], loss_mask))
    assert abs(losses["cudnn"] - losses["xla"]) < 1e-2 * abs(losses["xla"])
    assert abs(losses["cudnn"] - float(reference["loss"])) < 3e-2 * abs(float(reference["loss"]))
