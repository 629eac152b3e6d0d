"""Elementwise work on half-precision activations: computed in float32, rounded once, recomputed.

A chain of half-precision elementwise ops rounds after every op; one rounding at the end is the more
accurate result, and XLA's CPU compiler computes each half-precision op between two conversions, so the
float32 chain is also the cheaper one there. Autodiff of float32 work on half-precision inputs would keep
the float32 intermediates for the backward pass, each twice the size of an input (the traced stage-2
step of LLaMA-7B with scanned layers at 8 × 1024 tokens: five float32 copies of SwiGLU's 11008-wide
activations and four of the RMSNorms' inputs per layer, 70 GiB stacked by the scan); `recomputed` keeps
only the inputs and runs the function again in the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from owl_jax.config import Numerics
from owl_jax.ops import bits
from owl_jax.ops.numerics import is_half

Array = jax.Array


def in_float32(fn: Callable[..., Array], *xs: Array, numerics: Numerics) -> Array:
    """`fn` of float32 copies of `xs`, rounded once to `xs[0]`'s dtype (`fn` as is when
    `numerics.float32_elementwise` is off). The identity on float32 inputs."""
    if not numerics.float32_elementwise:
        return fn(*xs)
    return fn(*(x.astype(jnp.float32) for x in xs)).astype(xs[0].dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recomputed(fn: Callable[..., Array], numerics: Numerics, *xs: Array) -> Array:
    return fn(*xs)


def _recomputed_fwd(fn, numerics, *xs):
    return fn(*xs), bits.residuals(numerics, *xs)


def _recomputed_bwd(fn, numerics, res, g):
    return jax.vjp(fn, *bits.from_residuals(res))[1](g)


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


def recomputed(fn: Callable[..., Array], *xs: Array, numerics: Numerics) -> Array:
    """`fn(*xs)` whose backward pass keeps only `xs` (half-precision ones as bits where `numerics` says
    so) and runs `fn` again to differentiate it."""
    return _recomputed(fn, numerics, *xs)


def elementwise(fn: Callable[..., Array], *xs: Array, numerics: Numerics) -> Array:
    """An elementwise `fn` of `xs`: on half-precision inputs computed by `in_float32` and `recomputed`."""
    if not numerics.float32_elementwise or not is_half(xs[0].dtype):
        return fn(*xs)
    return recomputed(functools.partial(in_float32, fn, numerics=numerics), *xs, numerics=numerics)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout; the identity when `key` is None (evaluation) or `rate` is 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
