"""Sharded execution on 8 fake CPU devices (set up in conftest.py) equals one device."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import owl_jax
from helpers import load_fixture_model
from owl_jax.sharding import ShardingError, logical_to_spec, make_mesh, use_mesh

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def test_mesh_sizes_and_errors():
    mesh = make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ShardingError, match="cannot be split"):
        make_mesh(data=-1, fsdp=3)
    with pytest.raises(ShardingError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)


def test_rules_replicate_indivisible_dimensions():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("embed", "mlp"), (96, 256), mesh) == PartitionSpec("fsdp", "tensor")
    assert logical_to_spec((None, "positions", "vision_embed"), (1, 257, 64), mesh) == PartitionSpec(None, None, "fsdp")
    assert logical_to_spec(("vocab", "embed"), (1001, 96), mesh) == PartitionSpec(None, "fsdp")
    with pytest.raises(ShardingError, match="no rule"):
        logical_to_spec(("nonsense",))


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2), (8, 1, 1)])
def test_sharded_forward_equals_single_device(shape, fixture_dir, reference):
    mesh = make_mesh(*shape)
    model, _ = owl_jax.from_pretrained(fixture_dir / "checkpoint", mesh=mesh, show_progress=False)
    q = model.language_model.layers.q_proj.kernel[...]
    assert isinstance(q.sharding, NamedSharding) and q.sharding.mesh.shape == mesh.shape
    if shape[2] > 1:  # heads really are split over `tensor`
        assert q.addressable_shards[0].data.shape[-1] == q.shape[-1] // shape[2]
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    # pad the batch of 3 to a multiple of the data-parallel size with a copy of row 0
    rows = -(-3 // (shape[0] * shape[1])) * shape[0] * shape[1]
    take = np.arange(rows) % 3
    ids, mask = reference["input_ids"][take], reference["attention_mask"][take]
    images = _images_for(reference, take)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state).forward(*inputs))
    with use_mesh(mesh):
        logits = forward(
            state,
            jax.device_put(images),
            jax.device_put(ids.astype(np.int32), batch),
            jax.device_put(mask.astype(np.int32), batch),
        )
    single = load_fixture_model("checkpoint")
    expected = single(images, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits)[:3], reference["logits"], atol=1e-4, rtol=0)


def _images_for(reference, rows):
    per_row = {0: [0], 1: [1, 2], 2: []}
    return reference["pixel_values"][[i for r in rows for i in per_row[int(r)]]]
