"""A chat-completion body → the jobs that answer it: validation against the server's limits, tokenizing,
and one job per choice (`OwlServer.prepare`, run in the event loop's threadpool)."""

from __future__ import annotations

import dataclasses
import queue
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from owl_jax.serve.errors import ApiError
from owl_jax.serve.protocol import ChatRequest, parse_chat_request, parse_json_body
from owl_jax.serve.worker import Job

# Longer conversations are refused before tokenizing: no text that fits the context is this long (a token
# stands for a few characters), and tokenizing a 20 MiB body would hold the shared tokenizer for seconds.
PROMPT_CHARS_PER_POSITION = 64
SEED_RANGE = 2**63  # seeds are below this (`options`); choice i's seed is (seed + i) modulo it


class Prepared(NamedTuple):
    """A validated chat request and its jobs (one per choice), answered under `label`."""

    request: ChatRequest
    label: str
    jobs: list[Job]


def prepare_jobs(server: Any, body: bytes | Any, events: Callable[[], queue.Queue] = queue.Queue) -> Prepared:
    """Validate a chat-completion body (JSON bytes, or its parsed value) for `server` (an `OwlServer`) and
    build its jobs, one per choice, each with `events()` as its event queue.

    Raises ApiError for requests the server cannot serve: invalid fields (`owl_jax.serve.protocol`), media it
    refuses, conversations longer than the model's context, `logprobs` its worker cannot give.
    """
    if isinstance(body, (bytes, bytearray)):
        body = parse_json_body(bytes(body))
    p = server.processor
    request = parse_chat_request(
        body,
        model_name=server.model_name,
        load_image=server.load_image,
        max_new_tokens=server.max_new_tokens,
        eos_token_id=p.eos_token_id,
        pad_token_id=p.pad_token_id,
        bos_token_id=p.bos_token_id,
        max_images=max(0, (server.context_length - 1) // max(1, p.image_tokens)),
        load_video=server.load_video if server.takes_videos else None,
    )
    check_logprobs(request, server.worker)
    if len(request.prompt) > server.max_prompt_chars:  # tokenizing megabytes would hold the tokenizer for seconds
        raise ApiError(
            400,
            f"the conversation is {len(request.prompt)} characters; the server takes at most "
            f"{server.max_prompt_chars} ({PROMPT_CHARS_PER_POSITION} per position of the model's context of "
            f"{server.context_length})",
            code="context_length_exceeded",
            param="messages",
        )
    with server.tokenizer_lock:
        ids = p.encode_prompt(request.prompt)
    room = server.context_length - len(ids)
    config = request.config
    if room < 1 or (request.max_tokens_given and config.max_new_tokens > room):
        want = f" + {config.max_new_tokens} max_tokens" if request.max_tokens_given else ""
        media = f"{len(request.images)} images" + (f" and {len(request.videos)} videos" if request.videos else "")
        raise ApiError(
            400,
            f"the conversation is {len(ids)} tokens ({media} of "
            f"{p.image_tokens} tokens each){want}, more than the model's context of "
            f"{server.context_length} tokens; shorten it or lower max_tokens",
            code="context_length_exceeded",
            param="messages",
        )
    if config.max_new_tokens > room:  # the server's default length, shortened to fit the context
        config = dataclasses.replace(config, max_new_tokens=room)
    if config.top_k >= server.vocab_size:  # keeps every token: the same as no top-k (and one compiled step)
        config = dataclasses.replace(config, top_k=0)
    label = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    ids = np.asarray([ids], np.int32)
    pixel_values = p.preprocess_images(request.images)
    videos = p.preprocess_videos(request.videos) if request.videos else None
    extra = {"logprobs": True, "top_logprobs": request.top_logprobs} if request.logprobs else {}
    jobs = []
    for i in range(request.n):
        seeded = dataclasses.replace(config, seed=(config.seed + i) % SEED_RANGE) if config.do_sample else config
        name = label if request.n == 1 else f"{label}.{i}"
        jobs.append(Job(ids, pixel_values, seeded, label=name, events=events(), video_pixel_values=videos, **extra))
    return Prepared(request, label, jobs)


def check_logprobs(request: ChatRequest, worker: Any) -> None:
    """Refuse `logprobs` where the worker cannot give them: the serial worker (slots 0), beam search."""
    if not request.logprobs:
        return
    if request.config.num_beams > 1:
        raise ApiError(
            400, "'logprobs' is not available with beam search ('best_of' or 'num_beams' above 1)", param="logprobs"
        )
    if not getattr(worker, "supports_logprobs", False):
        raise ApiError(
            400,
            "'logprobs' needs the batching worker; this server runs one request at a time (--slots 0)",
            param="logprobs",
        )
