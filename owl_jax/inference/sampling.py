"""Choosing the next tokens: the decoding options and the logits processors, traced on the device.

The processors follow the released model's `generate` (HF transformers 4.28): `min_new_tokens` masks EOS,
`no_repeat_ngram_size` looks at the generated tokens (the released generate starts its token history from
BOS, not from the prompt), then temperature, top-k, top-p.

The compiled steps take the options in two parts: a `DecodeStructure` (static: which processors run, the
n-gram size, the token ids) and `DecodeValues` (traced scalars: temperature, top-p, top-k, min_new_tokens).
Beam search (`num_beams` > 1, `owl_jax.inference.beam`) runs the same processors on log-probabilities.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
NEG_INF = -1e30
_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True)
class DecodeStructure:
    """What shapes the compiled token choice: a static argument, one program per distinct structure."""

    do_sample: bool = False
    top_k: bool = False  # whether top-k masks (its k is a value)
    top_p: bool = False  # whether top-p masks (its threshold is a value)
    min_new_tokens: bool = False  # whether EOS is masked for the first steps (how many is a value)
    no_repeat_ngram_size: int = 0  # its n shapes the n-gram windows
    eos_token_id: int = 2
    pad_token_id: int = 0


class DecodeValues(NamedTuple):
    """The numbers the compiled token choice takes as traced scalars: a new value reuses the program."""

    temperature: Array  # float32
    top_p: Array  # float32
    top_k: Array  # int32
    min_new_tokens: Array  # int32


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding options (hashable).

    The compiled steps see them split in two, so that a server compiles once however many different
    settings its clients send (a compile per request setting would stall every other request and grow the
    cache of compiled programs without bound):

    - static, part of the compiled program (`structure()`): `do_sample`, whether `top_k` and `top_p` mask
      at all (`top_k > 0`, `top_p < 1`, only when sampling), whether `min_new_tokens` is used,
      `no_repeat_ngram_size` (its n shapes arrays) and the token ids;
    - values, traced scalars (`values()`): `temperature`, `top_p`, `top_k` and `min_new_tokens`; `seed`
      only seeds the random key and `max_new_tokens` is a traced limit (the token history is padded to a
      bucket), so neither compiles anything either.

    Beam search (`num_beams` > 1) is the released `generate(num_beams=...)`: `length_penalty` divides a
    finished hypothesis's summed log-probabilities by its length to that power (a traced value) and
    `early_stopping` (True, False or "never", static) says when a prompt's search ends; it never samples.
    `stop` holds stop strings (a string or a list of them; kept as a tuple): a row ends once its decoded text
    contains one, and its text is cut before it (`owl_jax.inference.stops`); they never compile anything.
    """

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
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

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
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, (int, np.integer)) or self.num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError(f"num_beams={self.num_beams} is beam search, which does not sample; set do_sample=False")
        penalty = self.length_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float, np.number)) or not np.isfinite(penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        return self

    def structure(self) -> DecodeStructure:
        """The static part (greedy decoding ignores the sampling options, so they do not enter it)."""
        return DecodeStructure(
            do_sample=bool(self.do_sample),
            top_k=bool(self.do_sample and self.top_k > 0),
            top_p=bool(self.do_sample and self.top_p < 1.0),
            min_new_tokens=self.min_new_tokens > 0,
            no_repeat_ngram_size=int(self.no_repeat_ngram_size),
            eos_token_id=int(self.eos_token_id),
            pad_token_id=int(self.pad_token_id),
        )

    def values(self) -> DecodeValues:
        """The traced part, as float32/int32 scalars (a temperature past float32's range is inf, as a
        constant in the program would be; a top-k past int32's keeps every token all the same)."""
        with np.errstate(over="ignore"):
            return DecodeValues(
                np.float32(self.temperature),
                np.float32(self.top_p),
                np.int32(min(self.top_k, _INT32_MAX)),
                np.int32(min(self.min_new_tokens, _INT32_MAX)),
            )


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


def warp(logits: Array, structure: DecodeStructure, values: DecodeValues) -> Array:
    """Temperature, then top-k (keeps every logit >= the k-th largest, ties included), then top-p (keeps the
    smallest prefix of the logits in descending order whose probability reaches `top_p`: the first token
    past it too); the masked logits become `NEG_INF`.

    k is a traced value, so the k-th largest comes from a sort rather than `lax.top_k` (whose k is static);
    top-p reuses that sort. The sort is stable, so tied logits rank in vocabulary order, as in the released
    warpers' sort.
    """
    logits = logits / values.temperature
    if not (structure.top_k or structure.top_p):
        return logits
    if structure.top_p:
        order = jnp.argsort(-logits, axis=-1)
        ranked = jnp.take_along_axis(logits, order, axis=-1)
    else:
        ranked = jnp.sort(logits, axis=-1, descending=True)
    if structure.top_k:
        k = jnp.clip(values.top_k, 1, logits.shape[-1])
        kth = jax.lax.dynamic_slice_in_dim(ranked, k - 1, 1, axis=-1)
        logits = jnp.where(logits < kth, NEG_INF, logits)
        ranked = jnp.where(ranked < kth, NEG_INF, ranked)  # the kept logits are a prefix: still descending
    if structure.top_p:
        probs = jax.nn.softmax(ranked, axis=-1)
        drop_ranked = jnp.cumsum(probs, axis=-1) - probs >= values.top_p  # keep the first past top_p
        drop = jnp.zeros_like(drop_ranked).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_ranked)
        logits = jnp.where(drop, NEG_INF, logits)
    return logits


def process_logits(
    logits: Array, step: Array, history: Array, history_len: Array, structure: DecodeStructure, values: DecodeValues
) -> Array:
    """Float32 logits `(B, V)` after the configured processors (and, when sampling, the warpers)."""
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    if structure.min_new_tokens:
        eos = jnp.arange(vocab) == structure.eos_token_id
        logits = jnp.where((step < values.min_new_tokens) & eos, NEG_INF, logits)
    if structure.no_repeat_ngram_size:
        banned = banned_ngram_tokens(history, history_len, structure.no_repeat_ngram_size, vocab)
        logits = jnp.where(banned, NEG_INF, logits)
    return warp(logits, structure, values) if structure.do_sample else logits


def select_tokens(
    logits: Array,
    step: Array,
    history: Array,
    history_len: Array,
    key: Array,
    structure: DecodeStructure,
    values: DecodeValues,
) -> Array:
    """Next tokens `(B,)` from logits `(B, V)`: the argmax, or a sample, of `process_logits`."""
    logits = process_logits(logits, step, history, history_len, structure, values)
    if not structure.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
