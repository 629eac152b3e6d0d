"""Masked next-token cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def next_token_loss_sums(logits: Array, input_ids: Array, loss_mask: Array) -> tuple[Array, Array]:
    """Sum of next-token cross-entropies over masked positions, and their count.

    Args:
      logits: `(B, L, V)`; position t predicts `input_ids[:, t + 1]`.
      input_ids: `(B, L)` (placeholders may be negative; mask them out).
      loss_mask: `(B, L - 1)`, nonzero where the target `input_ids[:, t + 1]` counts.

    Returns:
      `(sum of losses, number of counted tokens)`, both float32 scalars. Divide the global sums to get
      a mean that is exact under any sharding or gradient accumulation.
    """
    targets = input_ids[:, 1:]
    logits = logits[:, :-1].astype(jnp.float32)
    mask = (loss_mask > 0) & (targets >= 0)
    safe_targets = jnp.where(mask, targets, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, log_z - target_logits, 0.0)
    return nll.sum(), mask.sum().astype(jnp.float32)


def masked_next_token_loss(logits: Array, input_ids: Array, loss_mask: Array) -> Array:
    """Mean next-token cross-entropy over masked positions; exactly 0 when nothing is masked in."""
    total, count = next_token_loss_sums(logits, input_ids, loss_mask)
    return total / jnp.maximum(count, 1.0)
