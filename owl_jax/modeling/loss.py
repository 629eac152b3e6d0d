"""Masked next-token cross-entropy, from logits or, chunk by chunk, from hidden states."""

from __future__ import annotations

from collections.abc import Callable

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


def chunked_next_token_loss_sums(
    hidden: Array, head: Callable[[Array], Array], input_ids: Array, loss_mask: Array, *, chunk: int
) -> tuple[Array, Array]:
    """`next_token_loss_sums` from the final hidden states, `chunk` positions at a time.

    The float32 logits of one chunk `(B, chunk, V)` exist at a time, forward and backward (each chunk's
    logits are recomputed in the backward pass), instead of `(B, L, V)` for the whole batch: at a 32k
    vocabulary and 1024 positions that is 128 MiB per row saved twice over (logits and their gradient).

    Args:
      hidden: `(B, L, D)` final hidden states (`Owl.forward(..., return_hidden=True)`).
      head: hidden `(B, c, D)` → float32 logits `(B, c, V)` (`model.language_model.logits`).
      input_ids, loss_mask: as for `next_token_loss_sums`.
      chunk: positions per chunk; the last chunk is padded (padding is masked out).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    b, length, d = hidden.shape
    n = length - 1
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, pad)))
    mask = jnp.pad((loss_mask > 0) & (input_ids[:, 1:] >= 0), ((0, 0), (0, pad)))
    h = jnp.pad(hidden[:, :-1], ((0, 0), (0, pad), (0, 0)))
    split = lambda x: jnp.moveaxis(x.reshape(b, chunks, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def one(h_c, t_c, m_c):
        logits = head(h_c).astype(jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logits = jnp.take_along_axis(logits, jnp.where(m_c, t_c, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(m_c, log_z - target_logits, 0.0).sum()

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(h), split(targets), split(mask)))
    return total, mask.sum().astype(jnp.float32)
