"""Continuous batching on the host side: which request holds which decode slot, and when each one ends.

`SlotBatch` drives a `SlotDecoder` (`owl_jax.inference.slots`). `admit` starts a request in a free row,
`advance` runs decode steps for all rows holding a request in one device call and hands every new token to
its request's `on_token` callback; a request ends at EOS, at `max_new_tokens`, when its callback says a
stop string ended it, or when the caller `release`s it (e.g. its client went away), and its row is free at
once.

Steps per call follow the load. The host's work per call (reading, detokenizing and streaming one piece
per request) grows with the rows holding requests, while the device's work per step hardly does. So a
batch at most half full runs one step per call, and a lone request streams token by token; once at least
half the rows hold requests, each call runs `steps_per_call` steps, which spreads the host's work over as
many tokens, at the price of rows computing up to `steps_per_call - 1` tokens past their request's end
and of admissions waiting for the call in flight.

The device runs one call ahead of the host: `advance` queues call k + 1 before it reads call k's tokens,
so reading, streaming and admitting overlap the device's work and only the chosen tokens `(steps, B)`
cross to the host (the log-probabilities too, when a row asks for them). A request that ends is therefore
computed for one more call, whose tokens are dropped; each queued output remembers which request held
each row when it was queued, so a row that a new request took meanwhile never receives its predecessor's
token. A request admitted while others decode has its first token read with the next call's outputs, so
the rows decoding never wait for a prefill; one admitted into an idle batch has it read at once.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from owl_jax.inference.sampling import GenerationConfig
from owl_jax.inference.slot_sampling import Picks
from owl_jax.inference.slots import SlotDecoder


def fetch(picks: Picks, rows: Any = slice(None), logprobs: bool = False) -> Picks:
    """`picks` on the host (numpy); the log-probabilities only when `logprobs` (else None)."""
    if not logprobs:
        return Picks(np.asarray(jax.device_get(picks.tokens))[rows], None, None, None)
    host = jax.device_get(picks)
    return Picks(*(np.asarray(a)[rows] for a in host))


class TokenLogprob(NamedTuple):
    """A generated token's log-softmax of the raw logits, and the most likely tokens with theirs."""

    logprob: float
    top_ids: np.ndarray  # (N,) int32, most likely first
    top_logprobs: np.ndarray  # (N,) float32


@dataclasses.dataclass(eq=False)
class SlotRequest:
    """One prompt for a slot, and how it went.

    `on_token(token, logprob)` is called for every generated token in order (`logprob` is a `TokenLogprob`
    when `logprobs` is set and the token is not EOS, else None); it returns True when the token ended the
    request (a stop string). An exception from it ends the request with `finish_reason` "error".
    """

    input_ids: np.ndarray  # (L,)
    pixel_values: np.ndarray | None  # (N, C, H, W)
    config: GenerationConfig
    on_token: Callable[[int, TokenLogprob | None], bool] | None = None
    logprobs: bool = False
    video_pixel_values: np.ndarray | None = None  # (V, C, T, H, W)
    tokens: list[int] = dataclasses.field(default_factory=list)  # up to and including EOS or a stop's last token
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" once it has ended
    error: BaseException | None = None
    row: int = -1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class SlotBatch:
    """The requests in a `SlotDecoder`'s rows, decoded `steps_per_call` steps per device call while at
    least half the rows hold requests and one step per call below that. Only one thread may call it."""

    def __init__(self, decoder: SlotDecoder, steps_per_call: int = 1):
        if int(steps_per_call) < 1:
            raise ValueError(f"steps_per_call must be at least 1, got {steps_per_call}")
        self.decoder, self.steps_per_call = decoder, int(steps_per_call)
        self.rows: list[SlotRequest | None] = [None] * decoder.rows
        self._queued: collections.deque[tuple[Picks, list[tuple[int, SlotRequest]]]] = collections.deque()
        self._ended: list[SlotRequest] = []
        self._admitted = 0  # outputs queued by `admit` since the last `advance`

    @property
    def free(self) -> int:
        """Rows without a request."""
        return self.rows.count(None)

    @property
    def live(self) -> list[SlotRequest]:
        """The requests holding rows."""
        return [r for r in self.rows if r is not None]

    @property
    def busy(self) -> bool:
        """Whether requests hold rows or outputs wait to be read."""
        return bool(self._queued) or any(r is not None for r in self.rows)

    def steps_for(self, live: int) -> int:
        """Decode steps per call with `live` rows holding requests: `steps_per_call` from half the rows on,
        else 1 (two compiled step programs at most)."""
        return self.steps_per_call if 2 * live >= self.decoder.rows else 1

    def admit(self, request: SlotRequest) -> None:
        """Start `request` in a free row (its first token arrives with the next `advance`).

        ValueError for a request the slots cannot take (`SlotDecoder.refuses`, bad media placeholders) or
        when no row is free; the batch is unchanged then.
        """
        if None not in self.rows:
            raise ValueError("every slot is taken")
        row = self.rows.index(None)
        try:
            picks = self.decoder.admit(
                row, request.input_ids, request.pixel_values, request.config, request.video_pixel_values
            )
        except ValueError:
            raise
        except Exception as e:  # the device state may be gone: every request in flight fails
            self.fail_all(e)
            self._end(request, "error", e)
            return
        request.row = row
        if any(r is not None for r in self.rows):  # others decode: read its first token with the next step's
            self._admitted += 1
        self.rows[row] = request
        self._queued.append((picks, [(0, request)]))

    def release(self, request: SlotRequest, reason: str = "cancelled") -> None:
        """End `request` now (its tokens so far stay in `request.tokens`) and free its row."""
        if not request.done:
            self._end(request, reason)

    def advance(self) -> list[SlotRequest]:
        """Queue one call of decode steps (`steps_for(rows holding requests)`) for the rows holding requests,
        read the outputs queued before it (but those of admissions into a busy batch since the last call)
        and pass their tokens on; returns the requests that ended since the last call."""
        live = [(row, r) for row, r in enumerate(self.rows) if r is not None]
        keep, self._admitted = self._admitted, 0
        if live:
            try:
                picks = self.decoder.step(any(r.config.do_sample for _, r in live), self.steps_for(len(live)))
                self._queued.append((picks, live))
                keep += 1
            except Exception as e:
                self.fail_all(e)
        while len(self._queued) > keep:
            self._read(*self._queued.popleft())
        ended, self._ended = self._ended, []
        return ended

    def flush(self) -> list[SlotRequest]:
        """Read every queued output without queueing a step; returns the requests that ended."""
        self._admitted = 0
        while self._queued:
            self._read(*self._queued.popleft())
        ended, self._ended = self._ended, []
        return ended

    def fail_all(self, error: BaseException) -> None:
        """End every request with `error` and start over from empty rows (a failed step's state is gone)."""
        self._queued.clear()
        self._admitted = 0
        for request in self.live:
            self._end(request, "error", error)
        self.decoder.reset()

    # ------------------------------------------------------------------------------------ internals
    def _read(self, picks: Picks, holders: list[tuple[int, SlotRequest]]) -> None:
        holders = [(i, r) for i, r in holders if not r.done]
        if not holders:
            return
        try:
            host = fetch(picks, logprobs=any(r.logprobs for _, r in holders))
        except Exception as e:  # a failed step: its state is gone
            self.fail_all(e)
            return
        if host.tokens.ndim == 1:  # an admission's first token: one step of one row
            host = Picks(*(None if a is None else a[None] for a in host))
        tokens = host.tokens.tolist()  # (steps, rows)
        for i, request in holders:
            for t, step in enumerate(tokens):
                if request.done:
                    break
                self._take(request, step[i], host, t, i)

    def _take(self, request: SlotRequest, token: int, host: Picks, t: int, i: int) -> None:
        """Hand `request` its next token (`host`'s step `t`, row `i`) and end it if that token ends it."""
        cfg = request.config
        request.tokens.append(token)
        lp = None
        if request.logprobs and token != cfg.eos_token_id:
            lp = TokenLogprob(float(host.logprob[t, i]), host.top_ids[t, i], host.top_logprobs[t, i])
        try:
            stopped = bool(request.on_token(token, lp)) if request.on_token is not None else False
        except Exception as e:
            self._end(request, "error", e)
            return
        if token == cfg.eos_token_id or stopped:
            self._end(request, "stop")
        elif len(request.tokens) >= cfg.max_new_tokens:
            self._end(request, "length")

    def _end(self, request: SlotRequest, reason: str, error: BaseException | None = None) -> None:
        request.finish_reason, request.error = reason, error
        if 0 <= request.row < len(self.rows) and self.rows[request.row] is request:
            self.rows[request.row] = None
            self.decoder.release(request.row)
        self._ended.append(request)
