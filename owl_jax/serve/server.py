"""An OpenAI-compatible HTTP server for mPLUG-Owl, on the standard library only.

    server = make_server(model, processor, port=8000)
    server.serve_forever()          # or in a thread; server.shutdown() stops it (from another thread)

Stopping gracefully (`owl-serve` on SIGTERM or Ctrl-C): `stop_serving()` makes `serve_forever` return,
`drain(grace)` closes the listening socket, lets the running and queued requests finish for up to `grace`
seconds, cancels the rest (a streamed answer ends with an error event and `data: [DONE]`, any other gets a
503 JSON error) and waits briefly for those responses to be written.

Endpoints: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`), `GET /v1/models`,
`GET /health` and `GET /` (a chat page). Handler threads parse, validate and tokenize; one `ModelWorker`
thread runs the model, one request at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

from owl_jax.data import video
from owl_jax.data.pixels import resize
from owl_jax.inference.generate import Generator
from owl_jax.serve.errors import ApiError
from owl_jax.serve.handler import Handler
from owl_jax.serve.images import load_image_url
from owl_jax.serve.protocol import parse_chat_request
from owl_jax.serve.videos import load_video_url
from owl_jax.serve.worker import Job, ModelWorker

log = logging.getLogger("owl_jax.serve")
DEFAULT_MODEL_NAME = "mplug-owl"
# Longer conversations are refused before tokenizing: no text that fits the context is this long (a token
# stands for a few characters), and tokenizing a 20 MiB body would hold the shared tokenizer for ~30 s.
PROMPT_CHARS_PER_POSITION = 64


class OwlServer(ThreadingHTTPServer):
    """The HTTP server plus the model worker thread; build it with `make_server`.

    Attributes:
      model_name: the id `/v1/models` lists and requests may name.
      allow_local_files: whether `image_url` and `video_url` may name files on this machine.
      max_body_bytes, max_image_pixels, max_new_tokens: the limits requests are checked against (video
        frames larger than `max_image_pixels` are refused too).
      context_length: prompt + answer tokens the model takes (`max_position_embeddings`).
      takes_videos: whether the model is the video layout (requests may then hold `video_url` parts).
      num_frames: frames sampled from each video.
    """

    daemon_threads = True  # a slow client never blocks shutdown
    request_queue_size = 128  # the listen backlog (the standard library's 5 resets bursts of connections)
    response_wait = 5.0  # seconds `drain` waits for in-flight responses to be written after cancelling
    linger_seconds = 5.0  # how long a closing connection keeps reading what the client still sends

    def __init__(
        self,
        address: tuple[str, int],
        model: Any,
        processor: Any,
        *,
        generator: Generator | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        allow_local_files: bool = False,
        max_body_bytes: int = 20 * 2**20,
        max_image_pixels: int | None = None,
        max_new_tokens: int = 512,
        backlog: int | None = None,
        num_frames: int = 4,
    ):
        if processor is None:
            raise ValueError(
                "the server needs the model's processor (a checkpoint folder with tokenizer.model or tokenizer.json)"
            )
        video.check_num_frames(num_frames, "the server")
        if max_new_tokens < 1 or max_body_bytes < 1:
            raise ValueError("max_new_tokens and max_body_bytes must be positive")
        if backlog is not None:
            if backlog < 1:
                raise ValueError("backlog must be positive")
            self.request_queue_size = int(backlog)
        self.stopping = threading.Event()  # set once the server stops taking requests
        self._hurry = threading.Event()  # cuts the shutdown grace period short
        self._active = 0  # requests being handled (not idle keep-alive connections)
        self._active_changed = threading.Condition()
        self._drain_lock = threading.Lock()
        self._drained = False
        # The generator first: if building it fails, no socket has been bound yet.
        self.generator = generator or Generator(model)
        super().__init__(address, Handler)
        self.model, self.processor = model, processor
        self.model_name, self.allow_local_files = model_name, allow_local_files
        self.max_body_bytes, self.max_new_tokens = int(max_body_bytes), int(max_new_tokens)
        self.max_image_pixels = int(max_image_pixels or processor.max_image_pixels)
        self.context_length = int(model.config.text.max_position_embeddings)
        self.vocab_size = int(model.config.text.vocab_size)
        self.max_prompt_chars = PROMPT_CHARS_PER_POSITION * self.context_length
        self.takes_videos = getattr(processor, "layout", "image") == "video" and bool(model.config.video)
        self.num_frames = int(num_frames)
        # The processor's resize: the image layout squashes to S×S, the video layout crops the shortest edge.
        self.image_resize = "shortest_edge_crop" if getattr(processor, "layout", "image") == "video" else "squash"
        self.created = int(time.time())
        # The processor's tokenizer is shared by handler threads (encoding) and the worker (decoding).
        self.tokenizer_lock = threading.Lock()
        self.worker = ModelWorker(self.generator, self._decode)
        self.worker.start()

    @property
    def url(self) -> str:
        """`http://host:port` the server listens on (the real port when it was started on port 0)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop `serve_forever` (call it from another thread), then `drain(grace)`: requests in flight get
        `grace` seconds to finish, the rest are cancelled, and the model worker stops."""
        self.stop_serving()
        self.drain(grace)

    def stop_serving(self) -> None:
        """Make `serve_forever` return (call it from another thread; it waits for that)."""
        self.stopping.set()
        super().shutdown()

    def hurry(self) -> None:
        """Cut a running `drain`'s grace period short (e.g. on a second SIGTERM)."""
        self._hurry.set()

    def drain(self, grace: float = 0.0) -> bool:
        """Stop taking requests and finish the ones in flight; returns whether all finished in time.

        Closes the listening socket, refuses new chat requests (503), lets running and queued generations
        go on for up to `grace` seconds, cancels what is left (streams end with an error event, other
        requests get a 503) and waits up to `response_wait` seconds for the responses to be written. Call
        it after `serve_forever` has returned; calling it again does nothing.
        """
        with self._drain_lock:
            if self._drained:
                return True
            self._drained = True
        self.stopping.set()
        super().server_close()  # new connections are refused from now on
        pending = self.worker.pending
        if pending:
            log.info("stopping: %d requests in flight get up to %.1f s to finish", pending, grace)
        finished = self.worker.drain(grace, self._hurry)
        if not finished:
            log.info("stopping: cancelling %d unfinished requests", self.worker.pending)
        self.worker.stop()
        deadline = time.monotonic() + self.response_wait
        with self._active_changed:
            while self._active and time.monotonic() < deadline:
                self._active_changed.wait(0.05)
            if self._active:
                log.info("stopping: %d responses still unwritten", self._active)
                finished = False
        return finished

    def request_started(self) -> None:
        with self._active_changed:
            self._active += 1

    def request_finished(self) -> None:
        with self._active_changed:
            self._active -= 1
            self._active_changed.notify_all()

    def shutdown_request(self, request: socket.socket) -> None:
        """Close a connection gracefully: send our FIN, then read and drop what the client still sends.

        Closing a socket whose unread input is not empty makes the kernel reset the connection, and the
        reset can destroy our answer (a 411, 413 or 400 sent before the body was read) before the client
        reads it. So the server stops writing, drains until the client closes too, for at most
        `linger_seconds`, and only then closes.
        """
        try:
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + self.linger_seconds
            while (left := deadline - time.monotonic()) > 0:
                request.settimeout(left)
                if not request.recv(1 << 16):
                    break
        except OSError:  # reset, timed out, or already closed
            pass
        self.close_request(request)

    def server_close(self) -> None:
        """Close the listening socket and stop the model worker."""
        super().server_close()
        worker = getattr(self, "worker", None)  # absent when binding the socket failed in __init__
        if worker is not None:
            worker.stop()

    def _decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.processor.decode(ids)

    def load_image(self, url: str, name: str) -> Image.Image:
        """An `image_url` → RGB image of the model's size, under this server's rules (ApiError otherwise).

        Resizing here, as each image is decoded, keeps one decoded image at a time instead of all of a
        request's. The resize is the processor's for the model's layout (`owl_jax.data.pixels`: a squash,
        or the shortest edge and a centre crop), so `preprocess_images` then sees images already of its
        size, which it leaves as they are.
        """
        image = load_image_url(
            url, allow_local_files=self.allow_local_files, max_pixels=self.max_image_pixels, name=name
        )
        return Image.fromarray(resize(image, self.processor.image_size, self.image_resize))

    def load_video(self, url: str, name: str) -> np.ndarray:
        """A `video_url` → its `num_frames` sampled frames `(T, 224, 224, 3)` uint8 (ApiError otherwise)."""
        return load_video_url(
            url,
            allow_local_files=self.allow_local_files,
            num_frames=self.num_frames,
            max_frame_pixels=min(self.max_image_pixels, video.MAX_FRAME_PIXELS),
            backend=getattr(self.processor, "video_backend", "auto"),
            name=name,
        )

    def prepare(self, body: Any) -> tuple[Any, Job]:
        """Validate a chat-completion body and build its `Job` (ApiError for requests that cannot be served)."""
        p = self.processor
        request = parse_chat_request(
            body,
            model_name=self.model_name,
            load_image=self.load_image,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=p.eos_token_id,
            pad_token_id=p.pad_token_id,
            bos_token_id=p.bos_token_id,
            max_images=max(0, (self.context_length - 1) // max(1, p.image_tokens)),
            load_video=self.load_video if self.takes_videos else None,
        )
        if len(request.prompt) > self.max_prompt_chars:  # tokenizing megabytes would hold the tokenizer for seconds
            raise ApiError(
                400,
                f"the conversation is {len(request.prompt)} characters; the server takes at most "
                f"{self.max_prompt_chars} ({PROMPT_CHARS_PER_POSITION} per position of the model's context of "
                f"{self.context_length})",
                code="context_length_exceeded",
                param="messages",
            )
        with self.tokenizer_lock:
            ids = p.encode_prompt(request.prompt)
        room = self.context_length - len(ids)
        config = request.config
        if room < 1 or (request.max_tokens_given and config.max_new_tokens > room):
            want = f" + {config.max_new_tokens} max_tokens" if request.max_tokens_given else ""
            media = f"{len(request.images)} images" + (f" and {len(request.videos)} videos" if request.videos else "")
            raise ApiError(
                400,
                f"the conversation is {len(ids)} tokens ({media} of "
                f"{p.image_tokens} tokens each){want}, more than the model's context of "
                f"{self.context_length} tokens; shorten it or lower max_tokens",
                code="context_length_exceeded",
                param="messages",
            )
        if config.max_new_tokens > room:  # the server's default length, shortened to fit the context
            config = dataclasses.replace(config, max_new_tokens=room)
        if config.top_k >= self.vocab_size:  # keeps every token: the same as no top-k (and one compiled step)
            config = dataclasses.replace(config, top_k=0)
        job = Job(
            np.asarray([ids], np.int32),
            p.preprocess_images(request.images),
            config,
            label=f"chatcmpl-{uuid.uuid4().hex[:24]}",
            video_pixel_values=p.preprocess_videos(request.videos) if request.videos else None,
        )
        return request, job

    def models(self) -> dict:
        """The `/v1/models` listing."""
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        """The model's `/v1/models` entry; `input_modalities` says which content parts requests may hold."""
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "owl_jax",
            "input_modalities": ["text", "image"] + (["video"] if self.takes_videos else []),
        }


def make_server(model: Any, processor: Any, *, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> OwlServer:
    """An `OwlServer` bound to `host:port` (port 0: any free port, see `server.url`), not yet serving.

    Args:
      model, processor: from `owl_jax.from_pretrained`.
      options: `OwlServer` keywords: `model_name`, `allow_local_files`, `max_body_bytes`, `max_image_pixels`
        (default: the processor's), `max_new_tokens` (default and ceiling of `max_tokens`), `generator`,
        `backlog` (the listen queue, default 128), `num_frames` (frames per video, default 4).

    Call `serve_forever()` (e.g. in a thread), then `shutdown(grace)` and `server_close()` to stop.
    """
    return OwlServer((host, port), model, processor, **options)
