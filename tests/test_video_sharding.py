"""The video model sharded over 8 fake CPU devices (set up in conftest.py) equals one device."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import owl_jax
from helpers import VIDEO_FIXTURE, load_fixture_model
from owl_jax.sharding import make_mesh, use_mesh

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices"),
    pytest.mark.compile_quickly,  # sharded and single-device results are compared under the same setting
]


def test_sharded_video_forward_equals_single_device():
    with np.load(VIDEO_FIXTURE / "reference.npz") as data:
        ref = {k: data[k] for k in ("input_ids", "attention_mask", "pixel_values", "video_pixel_values", "logits")}
    mesh = make_mesh(2, 2, 2)
    model, _ = owl_jax.from_pretrained(VIDEO_FIXTURE / "checkpoint", mesh=mesh, show_progress=False)
    up = model.vision_model.layers.temporal.up_proj.kernel[...]  # (layers, D/2, D): D over fsdp, D/2 over tensor
    assert isinstance(up.sharding, NamedSharding) and up.addressable_shards[0].data.shape == (2, 16, 32)
    # 4 rows (a copy of row 0 added) split over data × fsdp; row 3 shows video 0 again
    take = np.array([0, 1, 2, 0])
    ids, mask = ref["input_ids"][take].astype(np.int32), ref["attention_mask"][take].astype(np.int32)
    videos = ref["video_pixel_values"][take]
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    graphdef, state = nnx.split(model)
    forward = jax.jit(
        lambda state, *inputs: nnx.merge(graphdef, state).forward(*inputs[:3], video_pixel_values=inputs[3])
    )
    with use_mesh(mesh):
        logits = forward(
            state,
            jax.device_put(ref["pixel_values"]),
            jax.device_put(ids, batch),
            jax.device_put(mask, batch),
            jax.device_put(videos, batch),
        )
    single = load_fixture_model(str(VIDEO_FIXTURE / "checkpoint"))
    expected = np.asarray(single(ref["pixel_values"], ids, mask, videos))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)
    real = ref["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[:3][real], ref["logits"][real], atol=1e-4, rtol=0)
