"""Named TPU targets: a slice type as Google Cloud names it, or a raw topology, → the topology to compile for
and the chip's published figures.

    v5p-256      v5p, 256 TensorCores = 128 chips (4x4x8)      v4-128     v4, 128 TensorCores = 64 chips (4x4x4)
    v5e-256      v5e, 256 chips (16x16); also v5litepod-256    v6e-64     v6e (Trillium), 64 chips (8x8)
    2xv5e-256    two v5e-256 slices (multi-slice, over the data-center network)
    v5e:2x2      a raw topology: v4:AxBxC, v5p:AxBxC, v5e:AxB or v6e:AxB (chips per side)

v4 and v5p names count TensorCores (two per chip, one JAX device per chip in megacore mode); v5e and v6e names
count chips (one TensorCore each).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One chip generation: how the TPU runtime names its topologies, and its published figures."""

    family: str  # "v4", "v5p", "v5e", "v6e"
    topology_prefix: str  # the runtime's name in topology strings ("v5" is v5p)
    chip_config: str  # "megacore": one device per chip of two TensorCores; "default": one TensorCore
    cores_per_chip: int  # TensorCores counted in the slice's name per chip (2 for v4/v5p names)
    dims: int  # 3-D torus/mesh (v4, v5p) or 2-D (v5e, v6e)
    accelerator_type: str  # the slice name prefix ("v5litepod" for v5e)
    hbm_bytes: int
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes_per_s: float


# Published Google Cloud TPU specifications, per chip (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e):
#   v4:  275 TFLOP/s bf16, HBM2 32 GiB at 1200 GB/s
#   v5e: 197 TFLOP/s bf16, HBM 16 GB at 819 GB/s
#   v5p: 459 TFLOP/s bf16, HBM2e 95 GB at 2765 GB/s
#   v6e: 918 TFLOP/s bf16, HBM 32 GB at 1640 GB/s
# The capacities are taken in GiB: the TPU compiler's own limit for a v5e program is 16 GiB less what the
# runtime reserves.
CHIPS = {
    "v4": Chip("v4", "v4", "megacore", 2, 3, "v4", 32 * GiB, 275e12, 1200e9),
    "v5p": Chip("v5p", "v5", "megacore", 2, 3, "v5p", 95 * GiB, 459e12, 2765e9),
    "v5e": Chip("v5e", "v5e", "default", 1, 2, "v5litepod", 16 * GiB, 197e12, 819e9),
    "v6e": Chip("v6e", "v6e", "default", 1, 2, "v6e", 32 * GiB, 918e12, 1640e9),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "trillium": "v6e"}


class TargetError(ValueError):
    """A target name that names no known TPU slice or topology."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice (or several) to compile for."""

    name: str
    chip: Chip
    shape: tuple[int, ...]  # chips per side of one slice
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The slice's accelerator type as Google Cloud names it (e.g. `v5p-256`, `v5litepod-16`)."""
        return f"{self.chip.accelerator_type}-{self.chips_per_slice * self.chip.cores_per_chip}"

    def topology_args(self) -> dict[str, Any]:
        """Keyword arguments of `jax.experimental.topologies.get_topology_desc` for this target."""
        per_host = tuple(min(s, 2) for s in self.shape) + (1,) * (3 - len(self.shape))
        # full pods and cubes close into tori: 16x16 for v5e/v6e, sides of 4 and more for v4/v5p
        torus = self.shape == (16, 16) if self.chip.dims == 2 else min(self.shape) >= 4
        return dict(
            platform="tpu",
            topology_name=self.topology_name,
            chip_config_name=self.chip.chip_config,
            chips_per_host_bounds=per_host,
            num_slices=self.num_slices,
            wrap=(torus,) * 3,
        )

    def devices(self) -> list:
        """The target's devices (abstract: for compiling, nothing runs on them)."""
        from jax.experimental import topologies

        prepare_environment(self)
        return list(topologies.get_topology_desc(**self.topology_args()).devices)


def _shape_for(chip: Chip, chips: int) -> tuple[int, ...] | None:
    """The standard slice shape with `chips` chips: 2-D 1x1, 2x2, 2x4, 4x4, ... 16x16; 3-D 2x2x1, 2x2x2,
    then doubling the last, middle and first sides in turn (2x2x4, 2x4x4, 4x4x4, 4x4x8, ...)."""
    if chip.dims == 2:
        shapes = [(1, 1)] + [(2 ** (k // 2), 2 ** (k - k // 2)) for k in range(2, 9)]
    else:
        shapes, s = [(2, 2, 1)], [2, 2, 2]
        for i in range(12):
            shapes.append(tuple(s))
            s[2 - i % 3] *= 2
    return next((s for s in shapes if math.prod(s) == chips), None)


def valid_names() -> str:
    return "v4-N, v5p-N (N TensorCores), v5e-N (aka v5litepod-N), v6e-N (N chips), KxNAME, or v5e:2x2-style topologies"


def parse_target(name: str) -> Target:
    """`v5p-256`, `v5e-16`, `v5litepod-4`, `v4-128`, `v6e-64`, `2xv5e-256`, `v5e:2x2`, `v5p:2x2x1` → Target."""
    text = name.strip().lower()
    slices = 1
    multi = re.fullmatch(r"(\d+)x(.+)", text)
    if multi and not re.fullmatch(r"\d+(x\d+)*", text):
        slices, text = int(multi.group(1)), multi.group(2)
    raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    named = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    family = (raw or named).group(1) if (raw or named) else ""
    chip = CHIPS.get(_ALIASES.get(family, family))
    if chip is None or slices < 1:
        raise TargetError(f"unknown target {name!r}; valid: {valid_names()}")
    if raw:
        shape = tuple(int(s) for s in raw.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise TargetError(f"target {name!r}: a {chip.family} topology has {chip.dims} sides, e.g. {_example(chip)}")
    else:
        count = int(named.group(2))
        shape = None if count % chip.cores_per_chip else _shape_for(chip, count // chip.cores_per_chip)
        if shape is None:
            raise TargetError(f"unknown target {name!r}: no {chip.family} slice of {count}; valid: {valid_names()}")
    return Target(name, chip, shape, slices)


def _example(chip: Chip) -> str:
    return f"{chip.family}:{'x'.join(['2'] * chip.dims)}"


def prepare_environment(target: Target | None = None) -> None:
    """Settings the TPU runtime reads when it loads on a host without TPUs (before the first topology is
    made): a slice type to describe, this host as its only worker, and leave to load beside another process
    that holds the runtime. Values already set are kept."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type if target else "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
