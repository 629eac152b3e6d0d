"""Resolving a `Numerics` option for the platform a program is compiled for.

This is the one place that asks which platform it is: every route of `owl_jax.ops` reads the resolved
option, and nothing else in the package looks at the backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from owl_jax.config import Numerics

HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def platform() -> str:
    """The platform programs are compiled for: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


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
