"""Choosing the next tokens: the decoding options and the logits processors, traced on the device.

The processors follow the released model's `generate` (HF transformers 4.28): `min_new_tokens` masks EOS,
`no_repeat_ngram_size` looks at the generated tokens (the released generate starts its token history from
BOS, not from the prompt), then temperature, top-k, top-p.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options (hashable: part of the compiled step's static arguments)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 0
    bos_token_id: int = 1
    seed: int = 0

    def validate(self) -> GenerationConfig:
        if self.max_new_tokens < 1 or self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"need 0 <= min_new_tokens ({self.min_new_tokens}) <= max_new_tokens "
                f"({self.max_new_tokens}) and max_new_tokens >= 1"
            )
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("top_p must be in (0, 1], top_k and no_repeat_ngram_size >= 0")
        return self


def banned_ngram_tokens(history: Array, length: Array, n: int, vocab: int) -> Array:
    """`(B, V)` mask of tokens that would repeat an n-gram of `history[:, :length]` (HF's rule)."""
    b, h = history.shape
    if n <= 0 or h < n:
        return jnp.zeros((b, vocab), bool)
    idx = jnp.arange(h - n + 1)
    windows = jnp.stack([history[:, idx + k] for k in range(n)], axis=-1)  # (B, W, n)
    prefix = jax.vmap(lambda row, end: jax.lax.dynamic_slice(row, (end - (n - 1),), (n - 1,)))(
        history, jnp.maximum(length, n - 1)
    )
    in_range = (idx + n <= length[:, None]) & (length[:, None] >= n)
    hit = jnp.all(windows[:, :, : n - 1] == prefix[:, None, :], axis=-1) & in_range  # (B, W)
    banned = jnp.zeros((b, vocab), bool)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], hit.shape)
    return banned.at[rows, windows[:, :, n - 1]].max(hit)


def select_tokens(
    logits: Array, step: Array, history: Array, history_len: Array, key: Array, cfg: GenerationConfig
) -> Array:
    """Next tokens `(B,)` from float32 logits `(B, V)` after the configured processors."""
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if cfg.min_new_tokens:
        logits = jnp.where((step < cfg.min_new_tokens) & (jnp.arange(vocab) == cfg.eos_token_id), NEG_INF, logits)
    if cfg.no_repeat_ngram_size:
        logits = jnp.where(banned_ngram_tokens(history, history_len, cfg.no_repeat_ngram_size, vocab), NEG_INF, logits)
    if not cfg.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, min(cfg.top_k, vocab))[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        drop_sorted = cumulative - jax.nn.softmax(sorted_logits, axis=-1) >= cfg.top_p  # keep the first past top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, NEG_INF, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
