"""Running a stack of identical layers: one `lax.scan` (one compiled layer) or an unrolled loop.

A stacked module holds each parameter with a leading `layers` axis. `apply_layers` splits it into its
graph and state, and runs `body` on one slice of the state at a time, optionally under a named
rematerialisation policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx

from owl_jax import ops
from owl_jax.ops.matmul import WEIGHT_MATMUL

_WEIGHT_PRODUCTS = jax.checkpoint_policies.save_only_these_names(WEIGHT_MATMUL)
REMAT_POLICIES: dict[str, Any] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    # every matmul's output (a weight's product inside a custom rule is seen by its name, not as a dot)
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.dots_saveable, _WEIGHT_PRODUCTS),
    # the weights' products only: attention's batched products are recomputed
    "dots_with_no_batch_dims": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _WEIGHT_PRODUCTS
    ),
}


def apply_layers(
    layers: nnx.Module,
    carry: Any,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    *,
    num_layers: int,
    scan: bool = True,
    remat_policy: str = "none",
    xs: Any = None,
    layer_states: Sequence[Any] | None = None,
    xs_per_layer: bool = False,
) -> tuple[Any, Any]:
    """Fold `body(layer, carry, x_i) -> (carry, y_i)` over the stacked `layers`.

    Args:
      layers: a module whose parameters all carry a leading axis of size `num_layers`.
      carry: the running value (e.g. hidden states `(B, L, D)`).
      xs: optional per-layer inputs with a leading `num_layers` axis (e.g. dropout keys, cache slices).
      scan: `lax.scan` (compile one layer) when True, a Python loop otherwise.
      remat_policy: "none" or a key of `REMAT_POLICIES`.
      xs_per_layer: `xs` is a sequence of `num_layers` per-layer inputs instead of arrays with a leading
        layer axis, and the per-layer outputs come back as a list (unrolled loops only: `scan=False` or
        `layer_states`); per-layer buffers (a KV cache) then pass through without being restacked.
      layer_states: optional per-layer states (one `nnx.State` per layer, e.g. from `unstack_layer_states`):
        an unrolled loop over them replaces the stacked parameters, so no layer's weights are sliced out of
        the stack (on a GPU that slice is a copy, which triples a decode step's weight traffic).

    Returns:
      The final carry and the per-layer outputs stacked on a leading axis (None if `body` returns None).
    """
    graphdef, state = nnx.split(layers)
    if xs_per_layer:
        if scan and layer_states is None:
            raise ValueError("per-layer inputs need an unrolled loop (scan=False or layer_states)")
        if len(xs) != num_layers:
            raise ValueError(f"{len(xs)} per-layer inputs for {num_layers} layers")
    if layer_states is not None:
        if len(layer_states) != num_layers:
            raise ValueError(f"{len(layer_states)} layer states for {num_layers} layers")
        return _unrolled(
            lambda c, i, x: body(nnx.merge(graphdef, layer_states[i]), c, x), carry, xs, num_layers, xs_per_layer
        )

    def step(c: Any, inputs: Any) -> tuple[Any, Any]:
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat_policy != "none":
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat_policy!r}; choose none or one of {sorted(REMAT_POLICIES)}")
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)

    if scan:
        return jax.lax.scan(step, carry, (state, xs), length=num_layers)
    return _unrolled(lambda c, i, x: step(c, (ops.layer(state, i), x)), carry, xs, num_layers, xs_per_layer)


def _unrolled(
    step: Callable[[Any, int, Any], tuple[Any, Any]], carry: Any, xs: Any, num_layers: int, xs_per_layer: bool = False
):
    outputs = []
    for i in range(num_layers):
        carry, y = step(carry, i, xs[i] if xs_per_layer else jax.tree.map(lambda a: a[i], xs))
        outputs.append(y)
    if xs_per_layer:
        return carry, outputs
    if outputs and outputs[0] is not None:
        stacked = jax.tree.map(lambda *ys: jax.numpy.stack(ys), *outputs)
    else:
        stacked = None
    return carry, stacked


def unstack_layer_states(
    layers: nnx.Module, num_layers: int, transform: Callable[[Any], Any] | None = None
) -> list[Any]:
    """The stacked module's parameters as `num_layers` separate per-layer states (new device buffers, with
    the stack's shardings minus the layer axis), each passed through `transform` when given (in the same
    compiled call, so no untransformed copy is made)."""
    _, state = nnx.split(layers)
    fn = transform or (lambda st: st)
    return jax.jit(lambda st: [fn(jax.tree.map(lambda a: a[i], st)) for i in range(num_layers)])(state)


def layer_keys(key: jax.Array | None, num_layers: int) -> jax.Array | None:
    """One dropout key per layer (None stays None: deterministic)."""
    return None if key is None else jax.random.split(key, num_layers)
