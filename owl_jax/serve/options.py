"""A chat-completion request's decoding and response options, as the OpenAI API names them.

`n` choices (each a generation of its own, seeded `seed + i`), `logprobs` and `top_logprobs`, `max_tokens`
(or `max_completion_tokens`), `temperature`, `top_p`, `top_k`, `seed`, `stop`, `stream` and
`stream_options`, and `best_of` (or `num_beams`) for beam search. Every refusal is an `ApiError` 400 whose
`param` names the field.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, NamedTuple

from owl_jax.inference.generate import GenerationConfig
from owl_jax.serve.errors import ApiError

MAX_BEAMS = 8  # `best_of` / `num_beams`: each beam is a row of the KV cache, and each count compiles its search
MAX_STOPS, MAX_STOP_CHARS = 4, 256  # `stop` strings per request and characters per stop string
MAX_CHOICES = 8  # `n`: each choice is a generation of its own
MAX_TOP_LOGPROBS = 20  # `top_logprobs`, as in the OpenAI API


class Options(NamedTuple):
    """The decoding and response options of a request (`parse_options`)."""

    config: GenerationConfig
    stream: bool
    include_usage: bool  # stream_options.include_usage
    max_tokens_given: bool
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, key: str, default: Any, kind: type, check: Callable[[Any], bool], rule: str) -> Any:
    value = body.get(key)
    if value is None:
        return default
    # bool is an int in Python, but `"temperature": true` is a client bug worth reporting.
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if ok and kind is float:
        try:
            value = float(value)  # an integer of 400 digits does not fit a float: refused below
        except OverflowError:
            ok = False
    if not ok or (kind is float and not math.isfinite(value)) or not check(value):
        shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__} {repr(value)[:40]}..."
        raise _bad(f"'{key}' must be {rule}; got {shown}", key)
    return kind(value)


def _beams(body: dict) -> int:
    """The beams of a beam search from `best_of` (OpenAI's name for "keep the best of several") or the
    extension `num_beams`; 1 (no beam search) when neither is given."""
    rule = f"an integer from 1 to {MAX_BEAMS} (beams of a beam search)"
    best_of = _number(body, "best_of", None, int, lambda v: 1 <= v <= MAX_BEAMS, rule)
    num_beams = _number(body, "num_beams", None, int, lambda v: 1 <= v <= MAX_BEAMS, rule)
    if best_of is not None and num_beams is not None and best_of != num_beams:
        raise _bad(f"'best_of' ({best_of}) and 'num_beams' ({num_beams}) differ; send one of them", "num_beams")
    return best_of or num_beams or 1


def _stop(body: dict) -> tuple[str, ...]:
    """The `stop` strings: a string or a list of them (none: absent, "" or [])."""
    value = body.get("stop")
    if value is None or value == "" or value == []:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not (
        isinstance(stops, list)
        and len(stops) <= MAX_STOPS
        and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise _bad(
            f"'stop' must be a string or a list of at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters",
            "stop",
        )
    return tuple(stops)


def _logprobs(body: dict) -> tuple[bool, int]:
    """`(logprobs, top_logprobs)`: `top_logprobs` above 0 needs `logprobs` true, as in the OpenAI API."""
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad(f"'logprobs' must be true or false; got {str(logprobs)[:40]!r}", "logprobs")
    rule = f"an integer from 0 to {MAX_TOP_LOGPROBS} (alternatives per token)"
    top = _number(body, "top_logprobs", 0, int, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, rule)
    if top and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return bool(logprobs), top


def parse_options(
    body: dict, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int, bos_token_id: int
) -> Options:
    """`Options(config, stream, include_usage, max_tokens_given, n, logprobs, top_logprobs)` from a body.

    `temperature` 0 decodes greedily (top_p/top_k are then ignored); without `seed` sampling draws a random one.
    `best_of` (or `num_beams`) above 1 runs beam search, which does not sample: `temperature` must then be
    left out or 0. `stop` strings end the answer before the first one. `n` choices are `n` generations; the
    config is the first one's (the server seeds choice i with `seed + i`).
    """
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = max_new_tokens
    tokens = _number(
        body, key, None, int, lambda v: 1 <= v <= limit, f"an integer from 1 to {limit} (the server's --max-new-tokens)"
    )
    temperature = _number(body, "temperature", 1.0, float, lambda v: v >= 0, "a number >= 0")
    top_p = _number(body, "top_p", 1.0, float, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _number(body, "top_k", 0, int, lambda v: v >= 0, "an integer >= 0 (0: no top-k)")
    seed = _number(body, "seed", None, int, lambda v: 0 <= v < 2**63, "a non-negative integer")
    n = _number(body, "n", 1, int, lambda v: 1 <= v <= MAX_CHOICES, f"an integer from 1 to {MAX_CHOICES} (choices)")
    logprobs, top_logprobs = _logprobs(body)
    beams = _beams(body)
    if beams > 1 and body.get("temperature") is not None and temperature > 0:
        raise _bad(
            f"beam search ('best_of' or 'num_beams' {beams}) does not sample; leave 'temperature' out or send 0",
            "temperature",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false; got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    stop = _stop(body)
    sample = temperature > 0 and beams == 1
    if seed is None:
        seed = random.SystemRandom().randrange(2**31) if sample else 0
    config = GenerationConfig(
        max_new_tokens=tokens or max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_k=top_k if sample else 0,
        top_p=top_p if sample else 1.0,
        seed=seed,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        num_beams=beams,
        stop=stop,
    )
    return Options(config, stream, bool(options.get("include_usage")), tokens is not None, n, logprobs, top_logprobs)
