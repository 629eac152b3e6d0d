"""The FLOP accounting behind MFU, checked against the matmuls of the traced step itself."""

import jax
import numpy as np
import pytest

from helpers import OPTIM, one_device_mesh, tiny_batch, tiny_config, tiny_params
from owl_jax.config import LoRAConfig
from owl_jax.training.flops import forward_flops, jaxpr_matmul_flops, train_step_flops
from owl_jax.training.run import adapt_params
from owl_jax.training.trainer import Trainer

ROWS, LENGTH, SLOTS = 4, 16, 2


@pytest.mark.parametrize(
    "stage,lora,train_abstractor",
    [
        ("stage1", None, True),
        ("stage2", LoRAConfig(rank=4, alpha=8, dropout=0.0), True),
        (
            "stage2",
            LoRAConfig(
                rank=4,
                alpha=8,
                dropout=0.0,
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            ),
            False,
        ),
        ("stage2_full", None, True),
        ("text_pretrain", None, True),
    ],
)
def test_train_step_flops_match_the_traced_matmuls(stage, lora, train_abstractor):
    cfg = tiny_config(lora=lora)
    trainer = Trainer(
        cfg, stage=stage, mesh=one_device_mesh(), optim=OPTIM, total_steps=3, train_abstractor=train_abstractor
    )
    state = trainer.init_state(adapt_params(tiny_params(cfg), cfg, None, seed=0), seed=0)
    batch = trainer.global_batch(tiny_batch(rows=ROWS, length=LENGTH, slots=SLOTS))
    traced = jaxpr_matmul_flops(jax.make_jaxpr(trainer._step)(state, batch))
    # Every image slot is encoded (static shapes), and at 16 tokens (one causal block of the reference
    # attention) the reference path computes the full square.
    counted = train_step_flops(
        cfg, stage, rows=ROWS, seq_len=LENGTH, images=ROWS * SLOTS, train_abstractor=train_abstractor, causal_half=False
    )
    assert counted == pytest.approx(traced, rel=0.01)
    halved = train_step_flops(
        cfg, stage, rows=ROWS, seq_len=LENGTH, images=ROWS * SLOTS, train_abstractor=train_abstractor
    )
    assert halved < counted  # the MFU convention counts causal attention once


def test_forward_flops_match_the_traced_matmuls():
    cfg = tiny_config()
    trainer = Trainer(cfg, stage="stage1", mesh=one_device_mesh(), optim=OPTIM, total_steps=1)
    params = trainer.init_state(adapt_params(tiny_params(cfg), cfg, None, seed=0), seed=0).params
    batch = trainer.global_batch(tiny_batch(rows=ROWS, length=LENGTH, slots=SLOTS))
    traced = jaxpr_matmul_flops(jax.make_jaxpr(lambda p, b: trainer.logits(p, b, None))(params, batch))
    counted = forward_flops(cfg, rows=ROWS, seq_len=LENGTH, images=ROWS * SLOTS, causal_half=False)
    assert counted == pytest.approx(traced, rel=0.01)


def test_jaxpr_counter_counts_scans_and_batched_dots():
    x, w = np.ones((3, 5, 7), np.float32), np.ones((7, 11), np.float32)

    def f(x, w):
        y = jax.numpy.einsum("bij,jk->bik", x, w)  # 2·3·5·7·11
        z, _ = jax.lax.scan(lambda c, _: (c @ w.T @ w, None), y, None, length=4)  # 4 · 2 · (2·3·5·11·7)
        return z

    assert jaxpr_matmul_flops(jax.make_jaxpr(f)(x, w)) == 2 * 3 * 5 * 7 * 11 * (1 + 4 * 2)


@pytest.mark.parametrize(
    "stage,lora", [("stage1", None), ("stage2", LoRAConfig(rank=4, alpha=8, dropout=0.0)), ("text_pretrain", None)]
)
def test_recomputed_flops_match_the_traced_matmuls(stage, lora):
    # Under full remat JAX keeps only the recomputation the backward pass needs: every layer but its last
    # matmul. (Under the policies that save matmuls the jaxpr still holds duplicates, which the compiler
    # removes, so the jaxpr overstates what they run.)
    remat = "full"
    cfg = tiny_config(lora=lora, remat_policy=remat)
    trainer = Trainer(cfg, stage=stage, mesh=one_device_mesh(), optim=OPTIM, total_steps=3)
    state = trainer.init_state(adapt_params(tiny_params(cfg), cfg, None, seed=0), seed=0)
    batch = trainer.global_batch(tiny_batch(rows=ROWS, length=LENGTH, slots=SLOTS))
    traced = jaxpr_matmul_flops(jax.make_jaxpr(trainer._step)(state, batch))
    count = dict(rows=ROWS, seq_len=LENGTH, images=ROWS * SLOTS, causal_half=False)
    counted = train_step_flops(cfg, stage, remat=remat, **count)
    assert counted == pytest.approx(traced, rel=0.01)
    assert counted > train_step_flops(cfg, stage, **count)
