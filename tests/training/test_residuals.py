"""What a scanned half-precision train step keeps for its backward pass: the stacked residuals."""

import jax
import numpy as np
import pytest

from helpers import OPTIM, one_device_mesh, tiny_batch, tiny_params
from owl_jax.config import AbstractorConfig, LoRAConfig, Numerics, OwlConfig, TextConfig, VisionConfig
from owl_jax.sharding import use_mesh
from owl_jax.training.run import adapt_params
from owl_jax.training.trainer import Trainer

# Distinct widths per tower (and a third LLaMA layer), so each residual's origin shows in its shape.
TEXT_MLP, ABSTRACTOR_MLP = 40, 28


def _config(stage: str, numerics: Numerics) -> OwlConfig:
    cfg = OwlConfig(
        vision=VisionConfig(
            hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=32, patch_size=16
        ),
        abstractor=AbstractorConfig(
            hidden_size=16,
            intermediate_size=ABSTRACTOR_MLP,
            num_layers=2,
            num_heads=2,
            encoder_hidden_size=16,
            attention_dropout=0.0,
        ),
        text=TextConfig(
            vocab_size=64, hidden_size=24, intermediate_size=TEXT_MLP, num_layers=3, num_heads=2, num_kv_heads=2
        ),
        num_query_tokens=2,
        dtype="bfloat16",
        numerics=numerics,
    )
    return cfg.replace(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0)) if stage == "stage2" else cfg


def _stacked_outputs(jaxpr, out: list) -> list:
    """The stacked (per-iteration) outputs of every scan in `jaxpr`, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.extend(v.aval for v in eqn.outvars[eqn.params["num_carry"] :])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _stacked_outputs(inner, out)
    return out


@pytest.mark.parametrize("accelerator", [False, True], ids=["cpu-path", "accelerator-path"])
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_scanned_bf16_step_keeps_half_precision_inputs_only(stage, accelerator):
    # Float32 work on half-precision activations (SwiGLU, the ViT's activation, the norms) must keep its
    # half-precision inputs for the backward pass, not its float32 intermediates: at the 7B layout those
    # were 70 GiB per 8 x 1024 tokens. And a frozen kernel's product keeps no input (it has no gradient).
    # the routes of GPUs and TPUs, traced here, or the CPU's
    numerics = Numerics(matmul="xla", half_as_bits="off") if accelerator else Numerics(matmul="cpu", half_as_bits="on")
    cfg = _config(stage, numerics)
    trainer = Trainer(
        cfg, stage=stage, mesh=one_device_mesh(), optim=OPTIM, total_steps=10, prepare_frozen=not accelerator
    )
    state = trainer.init_state(adapt_params(tiny_params(cfg), cfg, None, seed=0), seed=0)
    batch = trainer.global_batch(tiny_batch())
    with use_mesh(trainer.mesh):
        jaxpr = jax.make_jaxpr(trainer._step)(state, batch).jaxpr
    stacked = _stacked_outputs(jaxpr, [])
    params = {tuple(a.shape[1:]) for a in jax.tree.leaves(state.params) if a.ndim >= 2}
    # per-layer activations: stacked outputs that are not a layer's parameter (or its gradient)
    acts = [a for a in stacked if a.ndim >= 3 and tuple(a.shape[1:]) not in params and a.shape[-1] > 1]
    assert acts
    float32 = [str(a) for a in acts if a.dtype == np.float32]
    assert not float32, float32
    text_mlp = [str(a) for a in acts if a.shape[-1] == TEXT_MLP]
    # SwiGLU's gate and up only: the frozen down projection keeps no copy of its input
    assert len(text_mlp) == 2, text_mlp
