"""Logical axis names → mesh axes: the one rules table, and the helpers that apply it.

Every parameter carries a tuple of logical axis names in its `axes` metadata (e.g. `("embed", "mlp")`)
and activations are constrained with the same vocabulary. `LOGICAL_RULES` maps each name onto axes of a
mesh named `data`, `fsdp` and `tensor`:

- `data`: pure data parallelism (parameters replicated); the one axis that spans slices in a multi-slice mesh;
- `fsdp`: data parallelism whose parameters and optimizer state are sharded (ZeRO-3 style);
- `tensor`: Megatron-style tensor parallelism over heads, MLP hidden units and the vocabulary.

A dimension that the mapped mesh axes do not divide evenly (e.g. the ViT's 257 positions) is replicated
instead of failing, so small and odd-sized models run on any mesh.

Quantized linear layers (`owl_jax.quant.QuantLinear`) need no rules of their own: `qvalue` carries its
kernel's axes (int4's packed input pairs keep the input axis's name, so a shard unpacks on its own) and
`qscale` the output axis's name, plus the input axis's on int4's group axis, so each shard of integers
finds its groups' scales on the same device whenever the mesh divides the groups (else they replicate).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# One place for every logical axis of the project. Values are a mesh axis, a tuple of mesh axes, or None.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "layers": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "qkv": "tensor",
    "patch": None,
    "positions": None,
    "queries": None,
    "lora_rank": None,
    "norm": None,
    None: None,
}


class ShardingError(ValueError):
    """A logical axis or mesh that the rules cannot resolve."""


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    num_slices: int | None = None,
) -> Mesh:
    """A `(data, fsdp, tensor)` mesh over `devices` (default `jax.devices()`); one size may be -1 to take the rest.

    Args:
      data, fsdp, tensor: the axis sizes; their product must equal the number of devices.
      devices: the devices to lay out (e.g. `jax.devices()` or an AOT topology's devices).
      num_slices: how many slices the devices span; None counts the distinct `slice_index` of the devices
        (devices without one, such as CPU devices, count as one slice).

    Layout:
      - more than one slice: `data` spans the slices over the data-center network (DCN), each slice holding
        `data // num_slices` of its indices, while `fsdp` and `tensor` stay inside a slice on the chips'
        interconnect (ICI), built with `mesh_utils.create_hybrid_device_mesh`. `data` must be a multiple of
        `num_slices`;
      - one slice of TPU devices (devices with `coords`): `mesh_utils.create_device_mesh` orders them so that
        neighbours along each axis are ICI neighbours;
      - otherwise (e.g. CPU devices): the devices in the given order, reshaped to `(data, fsdp, tensor)`.

    Axis types are Auto (GSPMD propagation), so matmuls sharded on a contracting dimension work.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ShardingError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"devices, but {len(devices)} are available"
        )
    if num_slices is None:
        num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices < 1:
        raise ShardingError(f"num_slices must be at least 1, got num_slices={num_slices}")
    grid = _device_grid(devices, sizes, num_slices)
    try:
        from jax.sharding import AxisType

        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    except (ImportError, TypeError):  # older jax: every axis is Auto already
        return Mesh(grid, MESH_AXES)


def _device_grid(devices: list[jax.Device], sizes: list[int], num_slices: int) -> np.ndarray:
    """The `(data, fsdp, tensor)` array of devices laid out as `make_mesh` documents."""
    data, fsdp, tensor = sizes
    if data % num_slices:
        raise ShardingError(f"mesh data={data} must be a multiple of num_slices={num_slices}")
    if num_slices > 1 and not all(hasattr(d, "slice_index") for d in devices):
        plain = next(d for d in devices if not hasattr(d, "slice_index"))
        raise ShardingError(f"num_slices={num_slices} needs devices with a slice_index, but {plain} has none")
    try:
        if num_slices > 1:
            return mesh_utils.create_hybrid_device_mesh(
                mesh_shape=(data // num_slices, fsdp, tensor),
                dcn_mesh_shape=(num_slices, 1, 1),
                devices=devices,
                allow_split_physical_axes=True,
            )
        if all(hasattr(d, "coords") for d in devices):
            return mesh_utils.create_device_mesh((data, fsdp, tensor), devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:  # e.g. devices of other slices than named
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShardingError(
            f"cannot lay out mesh data={data} x fsdp={fsdp} x tensor={tensor} over "
            f"{len(devices)} devices in num_slices={num_slices}: {first}"
        ) from e
    return np.asarray(devices, dtype=object).reshape(sizes)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None, rules: dict | None = None
) -> PartitionSpec:
    """The `PartitionSpec` for a value with logical `axes`.

    With `shape` and `mesh`, dimensions not divisible by their mesh axes are left replicated, and a mesh
    axis already used by an earlier dimension is not used again.
    """
    rules = LOGICAL_RULES if rules is None else rules
    if shape is not None and len(axes) != len(shape):
        raise ShardingError(f"logical axes {tuple(axes)} do not match the value's shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(axes):
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no rule; known axes: {sorted(k for k in rules if k)}")
        target = rules[name]
        mesh_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
            if shape is not None and mesh_axes:
                size = math.prod(mesh.shape[a] for a in mesh_axes)
                if shape[i] % size:
                    mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """A tree of `NamedSharding` matching an `nnx.State` (or tree of Variables) by each leaf's `axes`."""
    from flax import nnx

    def one(v: Any) -> Any:
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata().get("axes")
            value = v.get_value() if hasattr(v, "get_value") else v.value
            if axes is None:
                axes = (None,) * len(value.shape)
            return v.replace(named_sharding(mesh, axes, value.shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ------------------------------------------------------------------------------------------------
# Activation constraints: active only inside `use_mesh(mesh)` (JAX's own mesh context, `jax.set_mesh`), so
# single-device code pays nothing.
@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Make `constrain` shard activations on `mesh` while tracing inside this block (None: no mesh)."""
    if mesh is None:
        yield None
        return
    with jax.set_mesh(mesh):
        yield mesh


def active_mesh() -> Any:
    """The mesh of the enclosing `use_mesh` block (an abstract mesh), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axes, or `x` unchanged when no mesh is active."""
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))
