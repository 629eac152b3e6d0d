"""Meshes over several TPU slices, checked ahead of time on a described topology (no TPU needed).

`jax.experimental.topologies` describes two v5e 2x2 slices (8 chips) from libtpu alone; `make_mesh` lays
the `data` axis over the slices (the data-center network) and `fsdp`/`tensor` inside each slice, and a
sharded step compiles for that mesh without any array being made.
"""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from owl_jax.sharding import ShardingError, make_mesh

pytestmark = pytest.mark.compile_quickly

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed: TPU topologies cannot be described")

# A cross-slice reduction is run by the multi-slice runtime: XLA marks its transfers with this attribute.
DCN_REDUCTION = re.compile(r'_xla_megascale_transfer_type="(ALL_REDUCE|REDUCE_SCATTER)"')


@pytest.fixture(scope="module")
def two_slices():
    """The 8 devices of two v5e 2x2 slices (4 chips each), described by libtpu (no TPU needed).

    libtpu reads the machine's description from the environment: set here where unset, for this module only
    (the training subprocesses of other tests must not see a TPU worker list)."""
    from jax.experimental import topologies

    with pytest.MonkeyPatch.context() as patch:
        for key, value in (
            ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
            ("TPU_WORKER_HOSTNAMES", "localhost"),
            ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
        ):
            if key not in os.environ:  # os.environ.setdefault, undone after the module
                patch.setenv(key, value)
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name="v5e:2x2",
            chip_config_name="default",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=2,
            wrap=(False, False, False),
        )
        devices = list(topology.devices)
        assert sorted({d.slice_index for d in devices}) == [0, 1] and len(devices) == 8
        yield devices


@needs_libtpu
@pytest.mark.parametrize("interleave", [False, True], ids=["by-slice", "interleaved"])
@pytest.mark.parametrize("shape", [(2, 2, 2), (-1, 2, 2), (4, 1, 2), (2, 4, 1)])
def test_data_axis_spans_the_slices(two_slices, shape, interleave):
    devices = sorted(two_slices, key=lambda d: (d.id % 100_000, d.slice_index)) if interleave else two_slices
    mesh = make_mesh(*shape, devices=devices)
    data = mesh.shape["data"]
    assert mesh.devices.size == 8 and data % 2 == 0
    per_slice = data // 2
    for i in range(data):
        # every device at data index i is in one slice, and the slices follow each other along `data`
        assert {d.slice_index for d in mesh.devices[i].flat} == {i // per_slice}
    # inside a slice each chip appears once (fsdp and tensor never cross the DCN)
    for s in range(2):
        block = mesh.devices[s * per_slice : (s + 1) * per_slice].flat
        assert len({tuple(d.coords) for d in block}) == 4


@needs_libtpu
def test_one_slice_of_tpu_chips_is_laid_out_as_ici_neighbours(two_slices):
    chips = [d for d in two_slices if d.slice_index == 0]  # one slice: 4 chips on a 2x2 grid, inferred
    ring = make_mesh(1, 4, 1, devices=chips).devices.reshape(-1)
    # id order would step diagonally from (1,0) to (0,1); the ICI-aware order steps one link at a time
    hops = [sum(abs(a - b) for a, b in zip(p.coords, q.coords)) for p, q in zip(ring[:-1], ring[1:])]
    assert hops == [1, 1, 1]


def test_plain_devices_keep_their_order():
    devices = jax.devices()[:8]
    if len(devices) < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = make_mesh(2, 2, 2, devices=devices)
    assert list(mesh.devices.flat) == devices


@needs_libtpu
def test_data_not_a_multiple_of_the_slices_is_one_line_error(two_slices):
    with pytest.raises(ShardingError, match=r"data=1 must be a multiple of num_slices=2"):
        make_mesh(1, 4, 2, devices=two_slices)
    with pytest.raises(ShardingError, match=r"data=2 must be a multiple of num_slices=4"):
        make_mesh(2, 2, 2, devices=two_slices, num_slices=4)


def test_num_slices_error_on_plain_devices():
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 (fake) devices")
    with pytest.raises(ShardingError, match=r"data=1 must be a multiple of num_slices=2"):
        make_mesh(1, 2, 2, devices=devices, num_slices=2)
    with pytest.raises(ShardingError, match=r"num_slices=2") as info:  # CPU devices name no slice
        make_mesh(2, 2, 1, devices=devices, num_slices=2)
    assert "\n" not in str(info.value)


@needs_libtpu
def test_sharded_step_compiles_for_two_slices_with_a_dcn_reduction(two_slices):
    mesh = make_mesh(2, 2, 2, devices=two_slices)

    def step(x, w):  # (batch, d) @ (d, h), then the mean over the batch: a reduction over data and fsdp
        return jnp.mean(jnp.tanh(x @ w), axis=0)

    def compile_with(batch_spec):
        x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, batch_spec))
        w = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "tensor")))
        out = NamedSharding(mesh, PartitionSpec("tensor"))
        return jax.jit(step, out_shardings=out).lower(x, w).compile()

    compiled = compile_with(PartitionSpec(("data", "fsdp")))
    hlo = compiled.as_text()
    assert compiled.input_shardings[0][0].mesh.shape == mesh.shape
    assert re.search(r"\ball-reduce\(", hlo)  # the fsdp part of the mean, inside a slice
    assert DCN_REDUCTION.search(hlo), "the batch mean over `data` should reduce across the two slices"
    # the same step with the batch split only inside a slice needs nothing across slices
    local = compile_with(PartitionSpec("fsdp")).as_text()
    assert re.search(r"\ball-reduce\(", local) and not DCN_REDUCTION.search(local)
