"""Quantized integers and scales on a mesh of 8 CPU devices: placed by the kernel's logical axes."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import owl_jax
from helpers import FIXTURE
from owl_jax.quant import QuantSpec
from owl_jax.sharding import make_mesh, use_mesh

pytestmark = pytest.mark.compile_quickly
SPEC = QuantSpec(mode="int4", group_size=128)  # down_proj: 256 inputs in 2 groups; the others: 96 in 1


@pytest.fixture(scope="module")
def sharded():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    model, _ = owl_jax.from_pretrained(FIXTURE / "checkpoint", quantize=SPEC, mesh=mesh, show_progress=False)
    return mesh, model


def test_integers_shard_like_their_kernels_and_group_scales_with_them(sharded):
    _, model = sharded
    layers = model.language_model.layers
    specs = {
        # (layers, embed → fsdp, heads → tensor); int4 rows are packed input pairs (48 = 96 / 2)
        "q_proj/qvalue": ((2, 48, 96), PartitionSpec(None, "fsdp", "tensor")),
        "q_proj/qscale": ((2, 1, 96), PartitionSpec(None, None, "tensor")),  # one group: not split
        # (layers, mlp → tensor, embed → fsdp): each tensor shard holds 64 packed rows = 128 inputs = its group
        "down_proj/qvalue": ((2, 128, 96), PartitionSpec(None, "tensor", "fsdp")),
        "down_proj/qscale": ((2, 2, 96), PartitionSpec(None, "tensor", "fsdp")),
    }
    for name, (shape, spec) in specs.items():
        module, leaf = name.split("/")
        value = getattr(getattr(layers, module), leaf)[...]
        assert value.shape == shape and isinstance(value.sharding, NamedSharding), name
        assert value.sharding.spec == spec, name
    rows = layers.down_proj.qvalue[...].addressable_shards[0].data.shape[1]
    groups = layers.down_proj.qscale[...].addressable_shards[0].data.shape[1]
    assert 2 * rows == groups * 128  # a shard's inputs are exactly its scales' groups


def test_sharded_quantized_forward_equals_one_device(sharded, reference):
    mesh, model = sharded
    single, _ = owl_jax.from_pretrained(FIXTURE / "checkpoint", quantize=SPEC, show_progress=False)
    rows = np.arange(4) % 3  # a batch the data-parallel axes divide: rows 0, 1, 2, 0
    ids, mask = reference["input_ids"][rows], reference["attention_mask"][rows]
    images = reference["pixel_values"][[0, 1, 2, 0]]  # row 0: image 0; row 1: images 1-2; row 3: image 0
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state).forward(*inputs))
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with use_mesh(mesh):
        logits = forward(
            state, jax.device_put(images), jax.device_put(ids.astype(np.int32), batch), jax.device_put(mask, batch)
        )
    expected = single(images, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)
