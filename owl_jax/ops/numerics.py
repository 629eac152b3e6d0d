"""Resolving a `Numerics` option for the platform a program is compiled for.

This is the one place that asks which platform it is: every route of `owl_jax.ops` reads the resolved
option, and nothing else in the package looks at the backend.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from owl_jax.config import Numerics

HALF_DTYPES = (jnp.bfloat16, jnp.float16)
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("owl_jax_target_platform", default=None)


def platform() -> str:
    """The platform programs are compiled for: "cpu", "gpu" or "tpu" (this process's backend, or the one
    `compiling_for` names)."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(name: str) -> Iterator[None]:
    """Trace programs for platform `name` ("cpu", "gpu" or "tpu") inside this block, whatever this process
    runs on: ahead-of-time compilation for devices it does not have (e.g. `owl_jax.aot` on a CPU host
    compiling for a TPU topology), where every route must be the target's (splash attention compiled as a
    kernel, not interpreted)."""
    if name not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"platform must be cpu, gpu or tpu, got {name!r}")
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)


def resolve_for(numerics: Numerics, name: str) -> Numerics:
    """`resolve(numerics)` as on platform `name` (see `compiling_for`): for compiling ahead of time for
    devices this process does not have, where "auto" must not resolve by this host."""
    with compiling_for(name):
        return resolve(numerics)


def resolve(numerics: Numerics) -> Numerics:
    """`numerics` with every "auto" but attention's replaced by this platform's choice ("auto" attention
    is resolved per call, as it also depends on shapes and masks: `ops.attention`)."""
    cpu = platform() == "cpu"

    def pick(value: str, on_cpu: str, elsewhere: str) -> str:
        return value if value != "auto" else (on_cpu if cpu else elsewhere)

    return numerics.replace(
        matmul=pick(numerics.matmul, "cpu", "xla"),
        half_as_bits=pick(numerics.half_as_bits, "on", "off"),
        hoist_invariants=pick(numerics.hoist_invariants, "off", "on"),
    )


def compiler_options(numerics: Numerics) -> dict[str, str] | None:
    """XLA options for a program that runs the model (`jax.jit(..., compiler_options=...)`), or None.

    With `hoist_invariants` off, XLA's while-loop invariant code motion is left out (see
    `Numerics.hoist_invariants`): a stacked bf16 weight is then sliced inside the layer loop, one layer
    at a time. Pass these to your own `jax.jit` of `Owl.forward` on a CPU."""
    if resolve(numerics).hoist_invariants == "off":
        return {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    return None


def is_half(dtype) -> bool:
    return jnp.dtype(dtype) in HALF_DTYPES


def cpu_matmul(numerics: Numerics) -> bool:
    """Whether products take the CPU route (see `Numerics.matmul`)."""
    return resolve(numerics).matmul == "cpu"


def half_as_bits(numerics: Numerics, dtype) -> bool:
    """Whether arrays of `dtype` move as bit patterns (see `Numerics.half_as_bits`)."""
    return is_half(dtype) and resolve(numerics).half_as_bits == "on"
