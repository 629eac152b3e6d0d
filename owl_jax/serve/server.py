"""An OpenAI-compatible HTTP server for mPLUG-Owl: a FastAPI app served by uvicorn, and the model worker.

    server = make_server(model, processor, port=8000)
    server.serve_forever()          # or in a thread; server.shutdown() stops it (from another thread)

Stopping gracefully (`owl-serve` on SIGTERM or Ctrl-C): `stop_serving()` makes `serve_forever` return,
`drain(grace)` closes the listening socket, lets the running and queued requests finish for up to `grace`
seconds, cancels the rest (a streamed answer ends with an error event and `data: [DONE]`, any other gets a
503 JSON error) and waits briefly for those responses to be written. The event loop runs on a thread of
its own (`owl_jax.serve.runner`), so it goes on writing answers while `drain` waits.

Endpoints (`owl_jax.serve.app`): `POST /v1/chat/completions` (JSON, or server-sent events with
`"stream": true`), `GET /v1/models`, `GET /health`, `GET /` (a chat page) and `GET /openapi.json`. The
event loop reads bodies and writes answers; parsing, validation, media decoding and tokenizing run in its
threadpool (`prepare`); the model worker (`owl_jax.serve.worker.make_worker`: a batching scheduler with
`slots` rows, or one request at a time with `slots=0`) runs the model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from owl_jax.data import video
from owl_jax.data.pixels import resize
from owl_jax.inference.generate import Generator
from owl_jax.serve.app import ServerGate, build_app
from owl_jax.serve.events import Doorbell
from owl_jax.serve.fetch import UrlFetcher
from owl_jax.serve.images import load_image_url
from owl_jax.serve.jobs import PROMPT_CHARS_PER_POSITION, Prepared, prepare_jobs
from owl_jax.serve.runner import UvicornThread, bind
from owl_jax.serve.videos import load_video_url
from owl_jax.serve.worker import make_worker

log = logging.getLogger("owl_jax.serve")
DEFAULT_MODEL_NAME = "mplug-owl"


class OwlServer:
    """The HTTP server plus the model worker; build it with `make_server`.

    Attributes:
      model, processor, generator, worker: what answers (the worker runs the generator).
      model_name: the id `/v1/models` lists and requests may name.
      allow_local_files: whether `image_url` and `video_url` may name files on this machine.
      allow_url_hosts: the hosts whose http(s) media URLs are fetched (`owl_jax.serve.fetch`).
      max_body_bytes, max_image_pixels, max_new_tokens, max_connections: the limits requests are checked
        against (video frames larger than `max_image_pixels` are refused too; `limits` lists them all).
      context_length: prompt + answer tokens the model takes (`max_position_embeddings`).
      takes_videos: whether the model is the video layout (requests may then hold `video_url` parts).
      num_frames: frames sampled from each video.
      server_address: `(host, port)` it listens on; `url` the same as `http://host:port`.
    """

    request_queue_size = 128  # the listen backlog (bursts of connections beyond it are reset)
    response_wait = 5.0  # seconds `drain` waits for in-flight responses to be written after cancelling
    linger_seconds = 5.0  # how long a closing connection keeps reading what the client still sends
    request_timeout = 120.0  # seconds a connection may sit idle or trickle its request before it is dropped
    keep_alive_seconds = 30.0  # how long an idle keep-alive connection stays open between requests

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
        slots: int = 16,
        decode_steps: int = 4,
        allow_url_hosts: tuple[str, ...] | list[str] = (),
        url_timeout: float = 10.0,
        max_connections: int | None = 512,
    ):
        if processor is None:
            raise ValueError(
                "the server needs the model's processor (a checkpoint folder with tokenizer.model or tokenizer.json)"
            )
        video.check_num_frames(num_frames, "the server")
        if max_new_tokens < 1 or max_body_bytes < 1:
            raise ValueError("max_new_tokens and max_body_bytes must be positive")
        if slots < 0:
            raise ValueError(f"slots must be 0 (one request at a time) or more, got {slots}")
        if decode_steps < 1:
            raise ValueError(f"decode_steps must be at least 1, got {decode_steps}")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections must be positive, got {max_connections}")
        if backlog is not None:
            if backlog < 1:
                raise ValueError("backlog must be positive")
            self.request_queue_size = int(backlog)
        self.max_body_bytes, self.max_new_tokens = int(max_body_bytes), int(max_new_tokens)
        self.allow_url_hosts = tuple(allow_url_hosts)
        self.fetch = (
            UrlFetcher(self.allow_url_hosts, timeout=url_timeout, max_bytes=self.max_body_bytes)
            if self.allow_url_hosts
            else None
        )
        self.stopping = threading.Event()  # set once the server stops taking requests
        self._serving_stopped = threading.Event()  # makes serve_forever return
        self._hurry = threading.Event()  # cuts the shutdown grace period short
        self._active = 0  # requests being handled (not idle keep-alive connections)
        self._active_changed = threading.Condition()
        self._drain_lock = threading.Lock()
        self._drained = False
        self._doorbell: Doorbell | None = None
        # The generator first: if building it fails, no socket has been bound yet.
        self.generator = generator or Generator(model)
        self.socket = bind(address[0], address[1], self.request_queue_size)
        self.server_address = self.socket.getsockname()[:2]
        self.model, self.processor = model, processor
        self.model_name, self.allow_local_files = model_name, allow_local_files
        self.max_connections = max_connections
        self.max_image_pixels = int(max_image_pixels or processor.max_image_pixels)
        self.context_length = int(model.config.text.max_position_embeddings)
        self.vocab_size = int(model.config.text.vocab_size)
        self.max_prompt_chars = PROMPT_CHARS_PER_POSITION * self.context_length
        self.takes_videos = getattr(processor, "layout", "image") == "video" and bool(model.config.video)
        self.num_frames = int(num_frames)
        # The processor's resize: the image layout squashes to S×S, the video layout crops the shortest edge.
        self.image_resize = "shortest_edge_crop" if getattr(processor, "layout", "image") == "video" else "squash"
        self.created = int(time.time())
        # The processor's tokenizer is shared by the threadpool (encoding) and the worker (decoding).
        self.tokenizer_lock = threading.Lock()
        self.app = build_app(self)
        self.http = UvicornThread(
            ServerGate(self.app, self),
            self.socket,
            backlog=self.request_queue_size,
            linger_seconds=self.linger_seconds,
            request_timeout=self.request_timeout,
            keep_alive_seconds=self.keep_alive_seconds,
        )
        try:
            self.worker = make_worker(self.generator, self._decode, slots=slots, steps_per_call=decode_steps)
            self.worker.start()
        except BaseException:
            self.socket.close()
            raise
        self.slots = int(slots)

    @property
    def url(self) -> str:
        """`http://host:port` the server listens on (the real port when it was started on port 0)."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def limits(self) -> dict:
        """The limits requests are checked against."""
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_image_pixels": self.max_image_pixels,
            "max_new_tokens": self.max_new_tokens,
            "context_length": self.context_length,
            "max_connections": self.max_connections,
            "backlog": self.request_queue_size,
        }

    # ------------------------------------------------------------------------------------ lifecycle
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until `stop_serving()` (or `shutdown()`) is called from another thread or a signal handler.

        The event loop goes on running after this returns, until `drain` (or `server_close`) ends it.
        """
        if self.stopping.is_set():
            return
        self.http.start()
        while not self._serving_stopped.wait(poll_interval):
            if not self.http.is_alive():
                log.error("the HTTP server has stopped")
                return

    def shutdown(self, grace: float = 0.0) -> None:
        """Stop `serve_forever` (call it from another thread), then `drain(grace)`: requests in flight get
        `grace` seconds to finish, the rest are cancelled, and the model worker stops."""
        self.stop_serving()
        self.drain(grace)

    def stop_serving(self) -> None:
        """Make `serve_forever` return and refuse new chat requests (503); the connections open are still
        served until `drain`."""
        self.stopping.set()
        self._serving_stopped.set()

    def hurry(self) -> None:
        """Cut a running `drain`'s grace period short (e.g. on a second SIGTERM)."""
        self._hurry.set()

    def drain(self, grace: float = 0.0) -> bool:
        """Stop taking requests and finish the ones in flight; returns whether all finished in time.

        Closes the listening socket, refuses new chat requests (503), lets running and queued generations
        go on for up to `grace` seconds, cancels what is left (streams end with an error event, other
        requests get a 503), waits up to `response_wait` seconds for the responses to be written, and ends
        the event loop. Call it after `serve_forever` has returned; calling it again does nothing.
        """
        with self._drain_lock:
            if self._drained:
                return True
            self._drained = True
        self.stop_serving()
        self.http.close_listener()  # new connections are refused from now on
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
        self.http.stop()
        return finished

    def server_close(self) -> None:
        """Close the listening socket, end the event loop and stop the model worker."""
        self.stop_serving()
        self.http.close_listener()
        self.http.stop()
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.stop()

    def request_started(self) -> None:
        with self._active_changed:
            self._active += 1

    def request_finished(self) -> None:
        with self._active_changed:
            self._active -= 1
            self._active_changed.notify_all()

    def open_connections(self) -> int:
        """Connections open now (idle keep-alive ones included)."""
        return self.http.open_connections()

    # ------------------------------------------------------------------------------------- requests
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
            url, allow_local_files=self.allow_local_files, max_pixels=self.max_image_pixels, name=name, fetch=self.fetch
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
            fetch=self.fetch,
        )

    def doorbell(self, loop: Any) -> Doorbell:
        """The `Doorbell` of the event loop serving requests (made at its first request; loop thread only)."""
        if self._doorbell is None or self._doorbell.loop is not loop:
            self._doorbell = Doorbell(loop)
        return self._doorbell

    def prepare(self, body: bytes | Any, events: Callable[[], queue.Queue] = queue.Queue) -> Prepared:
        """Validate a chat-completion body (JSON bytes, or its parsed value) and build its jobs, one per
        choice, each with `events()` as its event queue (ApiError for requests that cannot be served)."""
        return prepare_jobs(self, body, events)

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
        `backlog` (the listen queue, default 128), `num_frames` (frames per video, default 4), `slots`
        (rows of the batching worker, default 16; 0: one request at a time), `decode_steps` (decode steps per
        device call of the batching worker once half its rows are busy, default 4), `allow_url_hosts`
        (hosts whose http(s) media URLs are fetched; none by default), `url_timeout` (seconds per fetch, default 10),
        `max_connections` (open connections beyond it get a 503; default 512, None: no limit).

    Call `serve_forever()` (e.g. in a thread), then `shutdown(grace)` and `server_close()` to stop.
    """
    return OwlServer((host, port), model, processor, **options)
