"""QLoRA: stage 2's adapters trained over frozen int8 language-model weights; what never trains."""

import jax
import numpy as np
import pytest

from helpers import OPTIM, one_device_mesh, run_steps, tiny_batch, tiny_config, tiny_training_config
from owl_jax.checkpoint import host_leaves
from owl_jax.config import ConfigError, LoRAConfig
from owl_jax.quant import QuantSpec
from owl_jax.quant.leaves import quantize_leaves
from owl_jax.quant.random_init import random_model
from owl_jax.training import validation
from owl_jax.training.optimizer import trainable
from owl_jax.training.run import adapt_params, model_config
from owl_jax.training.trainer import Trainer

pytestmark = pytest.mark.compile_quickly
LORA = LoRAConfig(rank=2, alpha=8, dropout=0.0)


def _stage2(cfg, params, **kw):
    trainer = Trainer(cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10, **kw)
    return run_steps(trainer, params, steps=2)  # (the first step runs at the warmup's learning rate 0)


def test_only_the_adapters_train_and_the_loss_follows_the_bf16_one():
    cfg = tiny_config(lora=LORA)
    float_params = host_leaves(random_model(cfg.replace(lora=None)))  # (built leaf by leaf: quicker)
    qcfg = cfg.replace(quant=QuantSpec(mode="int8"))
    q_flat = quantize_leaves(dict(float_params), qcfg.replace(lora=None))
    assert not any(p[-1] == "kernel" and p[0] == "language_model" and p[1] == "layers" for p in q_flat)
    # the reference: the first step's loss with the same float weights held frozen in bfloat16 and the same
    # fresh adapters (a forward pass on the first batch)
    reference = Trainer(
        cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10, frozen_dtype="bfloat16"
    )
    params = reference.init_state(adapt_params(float_params, cfg, None, seed=0), seed=0).params
    total, count = jax.jit(reference.loss_sums)(params, reference.global_batch(tiny_batch(seed=0)), None)
    bf16_loss = float(total / count)
    state, before, after, losses = _stage2(
        qcfg, adapt_params(q_flat, qcfg, None, seed=0), frozen_dtype="bfloat16", train_abstractor=False
    )
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    lora = {p for p in before if p[-1] in ("lora_a", "lora_b")}
    assert lora and changed == lora  # integers, scales and every other weight bit-identical
    assert after[("language_model", "layers", "q_proj", "qvalue")].dtype == np.int8
    assert after[("language_model", "layers", "q_proj", "qscale")].dtype == np.float32  # not cast to bf16
    assert all(np.isfinite(losses))
    np.testing.assert_allclose(losses[0], bf16_loss, rtol=0.02)
    assert losses[0] != bf16_loss  # the quantized weights are really the ones multiplied


def test_quantized_leaves_never_train_and_runs_refuse_stages_that_would():
    for stage in ("stage2", "stage2_full", "text_pretrain", "joint_pretrain"):
        assert not trainable(("language_model", "layers", "q_proj", "qvalue"), stage)
        assert not trainable(("language_model", "layers", "q_proj", "qscale"), stage)
    config = tiny_training_config(**{"model.quantize": "int8"})
    validation.validate(config)
    assert model_config(config).quant == QuantSpec(mode="int8")
    with pytest.raises(ConfigError, match="model.quantize='int3' must be one of"):
        validation.validate(tiny_training_config(**{"model.quantize": "int3"}))
    with pytest.raises(ConfigError, match="stages.stage2.kind='stage2_full' trains the language model"):
        validation.validate(tiny_training_config(**{"model.quantize": "int4", "stages.stage2.kind": "stage2_full"}))


def test_the_backward_pass_keeps_integers_not_float_kernels():
    """A scan stacks the residuals its backward pass needs: the quantized layers' must be their integers
    (forwarded from the stacks), never a float copy of every layer's dequantized kernel."""
    from helpers import all_eqns
    from owl_jax.checkpoint import flatten, nest

    cfg = tiny_config(lora=LORA, quant=QuantSpec(mode="int8"))
    trainer = Trainer(cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    flat = flatten(trainer.abstract_state().params)
    lora = {p: v for p, v in flat.items() if p[-1] in ("lora_a", "lora_b")}
    frozen = {p: v for p, v in flat.items() if p not in lora}
    batch = {k: jax.numpy.asarray(v) for k, v in tiny_batch().items()}
    loss = lambda tr, fr: trainer.loss_sums(nest({**flatten(fr), **flatten(tr)}), batch, None)[0]  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss))(nest(lora), nest(frozen)).jaxpr
    kernels = {tuple(v.shape) for p, v in flat.items() if p[-1] == "qvalue"}  # int8: the kernels' shapes
    scans = [e for e in all_eqns(jaxpr) if e.primitive.name == "scan"]
    assert scans and kernels
    stacked = {(tuple(v.aval.shape), v.aval.dtype) for e in scans for v in e.outvars}
    assert not [s for s, d in stacked if s in kernels and jax.numpy.issubdtype(d, jax.numpy.floating)]
