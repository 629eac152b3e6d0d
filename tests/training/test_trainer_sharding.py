"""Three training steps on 8 fake devices give the single-device losses and parameters on every mesh."""

import jax
import numpy as np
import pytest

from helpers import OPTIM, tiny_batch, tiny_config, tiny_params
from owl_jax.checkpoint import flatten
from owl_jax.config import LoRAConfig
from owl_jax.ops.bits import HalfBits
from owl_jax.sharding import make_mesh
from owl_jax.training.run import adapt_params
from owl_jax.training.trainer import Trainer

# A smaller step than the other tests: some gradients are zero up to rounding (a key bias cannot change a
# softmax), and Adam scales such noise up to about lr/1000 per step whatever the mesh.
OPTIM = dict(OPTIM, lr=1e-3)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
STAGES = {"stage1": tiny_config(), "stage2": tiny_config(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0))}


def train(
    stage: str, mesh, dtype: str = "float32", prepare_frozen: bool | None = None, scan: bool = True
) -> tuple[list[float], dict]:
    cfg = STAGES[stage].replace(dtype=dtype, scan_layers=scan)
    params = adapt_params(tiny_params(cfg), cfg, None, seed=0)
    trainer = Trainer(cfg, stage=stage, mesh=mesh, optim=OPTIM, total_steps=10, prepare_frozen=prepare_frozen)
    state = trainer.init_state(params, seed=0)
    losses = []
    for i in range(3):
        state, metrics = trainer.train_step(state, trainer.global_batch(tiny_batch(rows=8, seed=i)))
        losses.append(float(metrics["loss"]))
    return losses, {p: np.asarray(v) for p, v in flatten(jax.device_get(state.params)).items()}


_reference: dict = {}


def reference(stage: str):
    if stage not in _reference:
        _reference[stage] = train(stage, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    return _reference[stage]


# Every mesh layout (pure data parallel, data × fsdp × tensor, fsdp × tensor) and both stages, with the
# stage's own sharding rules (stage 2's LoRA factors) on the layouts that split weights.
@pytest.mark.parametrize("stage, shape", [("stage1", (2, 2, 2)), ("stage2", (8, 1, 1)), ("stage2", (1, 4, 2))])
def test_meshes_match_one_device(stage, shape):
    losses, params = train(stage, make_mesh(*shape))
    ref_losses, ref_params = reference(stage)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    for path, value in ref_params.items():
        np.testing.assert_allclose(params[path], value, atol=1e-5, rtol=0, err_msg="/".join(path))
    assert ref_losses[2] < ref_losses[0]  # it is really training


# Stage 1 with a scanned stack is checked on one device in test_trainer.py; here the mesh, once.
@pytest.mark.parametrize("stage,scan", [("stage2", False)])
def test_prepared_frozen_kernels_keep_their_sharding(stage, scan):
    # The transposed copies are sharded like their kernels with the last two axes swapped; bf16 steps on an
    # fsdp x tensor mesh are the same with and without them.
    mesh = make_mesh(1, 4, 2)
    cfg = STAGES[stage].replace(dtype="bfloat16", scan_layers=scan)
    trainer = Trainer(cfg, stage=stage, mesh=mesh, optim=OPTIM, total_steps=10)
    state = trainer.init_state(adapt_params(tiny_params(cfg), cfg, None, seed=0), seed=0)
    kernels, prepared = flatten(state.params), flatten(state.prepared)
    assert set(prepared) == set(trainer.prepared_paths) and prepared
    sharded = 0
    for p, kernel in prepared.items():
        spec = tuple(kernels[p].sharding.spec) + (None,) * (kernels[p].ndim - len(kernels[p].sharding.spec))
        if kernel.per_layer:  # unrolled: one array per layer, without the layer axis
            assert spec[0] is None and all(tuple(x.sharding.spec) == (spec[-1], spec[-2]) for x in kernel.w_t), p
            continue
        w_t = kernel.w_t.bits if isinstance(kernel.w_t, HalfBits) else kernel.w_t
        assert tuple(w_t.sharding.spec) == (*spec[:-2], spec[-1], spec[-2]), p
        assert w_t.dtype == (np.uint16 if isinstance(kernel.w_t, HalfBits) else jax.numpy.bfloat16)
        sharded += any(s is not None for s in spec[-2:])
    assert sharded  # some of them really are split over the mesh
    losses, params = train(stage, mesh, "bfloat16", prepare_frozen=True, scan=scan)
    ref_losses, ref_params = train(stage, mesh, "bfloat16", prepare_frozen=False, scan=scan)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-6, rtol=0)
    for path, value in ref_params.items():
        np.testing.assert_allclose(params[path], value, atol=1e-6, rtol=0, err_msg="/".join(path))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_adam_moments_are_sharded_like_their_parameters(stage):
    """Each of Adam's moments lives on the shards of its own parameter: a replicated moment would hold a full
    copy of the trained weights' optimizer state on every chip."""
    trainer = Trainer(STAGES[stage], stage=stage, mesh=make_mesh(1, 4, 2), optim=OPTIM, total_steps=10)
    state = trainer.abstract_state()
    params = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    split_moments = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        name = jax.tree_util.keystr(path)
        owner = [p for p in params if (".mu" in name or ".nu" in name) and name.endswith(p)]
        if owner:
            assert leaf.sharding == params[owner[0]].sharding, name
            split_moments += not leaf.sharding.is_fully_replicated
        else:
            assert leaf.shape == () and leaf.sharding.is_fully_replicated, name  # counts and flags
    assert split_moments  # the mesh really splits some trained parameters, and their moments with them
