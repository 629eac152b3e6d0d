"""HTTP request handling: routing, body limits, JSON and server-sent-event responses."""

from __future__ import annotations

import json
import logging
import queue
import re
import select
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from owl_jax.serve.errors import ApiError
from owl_jax.serve.page import INDEX_HTML

log = logging.getLogger("owl_jax.serve")

CHAT_PATH = "/v1/chat/completions"
GET_PATHS = ("/", "/index.html", "/health", "/v1/models")
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
DIGITS = re.compile(r"[0-9]{1,30}")  # str.isdigit() also takes "²", which int() refuses
POLL_INTERVAL = 0.2  # seconds between checks that the client of a running request is still connected
# Only the page's own inline script and style, images and videos from data:/blob: URLs, requests to this server.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "media-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text stays readable; text that is not valid Unicode is \\u-escaped)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only an ASCII escape can carry it
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class ClientGone(ConnectionAbortedError):
    """The client closed its connection while its request was running."""


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection of an `OwlServer` (keep-alive; streamed responses close it when done)."""

    protocol_version = "HTTP/1.1"
    server_version = "owl-jax-serve"
    timeout = 120  # seconds a connection may sit idle or trickle its body before it is dropped
    _unread = 0  # bytes of the request body not read yet

    # ------------------------------------------------------------------------------------------ routing
    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:
        # No CORS: a cross-origin page's preflight fails here, so it cannot post JSON to the model.
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        self.server.request_started()
        try:
            self._route(method)
        finally:
            self.server.request_finished()

    def _route(self, method: str) -> None:
        length = (self.headers.get("Content-Length") or "0").strip()
        if DIGITS.fullmatch(length):
            self._unread = int(length)
        else:  # where the body ends is unknown, and so is where the next request starts
            self._unread, self.close_connection = 0, True
        path = unquote(urlsplit(self.path).path)
        try:
            if len(set(self.headers.get_all("Content-Length") or ())) > 1:
                self.close_connection = True  # where this body ends is ambiguous: so is the next request
                raise ApiError(400, "the request has several different Content-Length headers")
            if path == CHAT_PATH:
                self._require(method, "POST")
                self._chat()
            elif path.startswith("/v1/models/"):
                self._require(method, "GET")
                if path[len("/v1/models/") :] != self.server.model_name:
                    raise ApiError(
                        404,
                        f"the model {path[len('/v1/models/') :]!r} does not exist; this server "
                        f"serves {self.server.model_name!r}",
                        code="model_not_found",
                    )
                self._send_json(200, self.server.model_card())
            elif path in GET_PATHS:
                self._require(method, "GET")
                if path == "/health":
                    if self.server.stopping.is_set():
                        self._send_json(503, {"status": "stopping"})
                    else:
                        self._send_json(200, {"status": "ok"})
                elif path == "/v1/models":
                    self._send_json(200, self.server.models())
                else:
                    self._send(
                        200,
                        INDEX_HTML.encode("utf-8"),
                        "text/html; charset=utf-8",
                        {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"},
                    )
            else:
                raise ApiError(
                    404,
                    f"no such endpoint: {method} {path}; see GET /v1/models, POST {CHAT_PATH}, GET /health and GET /",
                    code="not_found",
                )
        except ApiError as e:
            self._send_error(e)
        except CLIENT_GONE:
            log.info("%s went away before the response was sent", self.address_string())
            self.close_connection = True
        except Exception as e:  # a bug: answer 500 rather than dropping the connection
            log.exception("unexpected error handling %s %s", method, path)
            self._send_error(ApiError(500, f"internal server error: {type(e).__name__}", type="server_error"))

    def _require(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise _MethodNotAllowed(allowed, method, unquote(urlsplit(self.path).path))

    # ----------------------------------------------------------------------------------- chat requests
    def _read_json(self) -> Any:
        """The request body parsed as JSON, after checking its size (before reading it) and type."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked request bodies are not supported; send a Content-Length header")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        if not DIGITS.fullmatch(length.strip()):
            raise ApiError(400, f"invalid Content-Length {length[:40]!r}")
        length = int(length)
        if length > self.server.max_body_bytes:
            raise self._too_large(length)
        # A cross-site page can send text/plain without a CORS preflight; JSON needs one, which we refuse.
        if self.headers.get_content_type() != "application/json":
            got = (self.headers.get("Content-Type") or "")[:80] or None
            raise ApiError(415, f"send the request as Content-Type: application/json (got {got!r})")
        data = self.rfile.read(length)
        self._unread = 0
        if len(data) < length:
            self.close_connection = True
            raise ApiError(400, f"the request body ended after {len(data)} of {length} bytes")
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError, undecodable bytes, integers of over 4300 digits
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None

    def _too_large(self, length: int) -> ApiError:
        return ApiError(
            413,
            f"the request body is {length} bytes, more than the server's limit of "
            f"{self.server.max_body_bytes} bytes (--max-body-mb); send smaller images",
            code="request_too_large",
        )

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (`Expect: 100-continue`, as curl does)."""
        length = (self.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > self.server.max_body_bytes:
            self.close_connection = True
            self._send_error(self._too_large(int(length)))
            return False
        return super().handle_expect_100()

    def _chat(self) -> None:
        body = self._read_json()
        if self.server.stopping.is_set():
            raise ApiError(503, "the server is shutting down", type="server_error")
        request, job = self.server.prepare(body)
        self.server.worker.submit(job)
        if request.stream:
            self._stream(request, job)
            return
        pieces = []
        while True:
            kind, value = self._next_event(job)
            if kind == "error":
                raise value
            if kind == "done":
                break
            pieces.append(value)
        self._send_json(
            200,
            {
                "id": job.label,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.server.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": value.finish_reason,
                    }
                ],
                "usage": _usage(value),
            },
        )

    def _stream(self, request: Any, job: Any) -> None:
        # Wait for the first event before answering, so a failure before any text still gets a real status.
        event = self._next_event(job)
        if event[0] == "error":
            raise event[1]
        created = int(time.time())

        def chunk(delta: dict, finish: Any = None) -> dict:
            return {
                "id": job.label,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.server.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True
        try:
            self._event(chunk({"role": "assistant", "content": ""}))
            while True:
                kind, value = event
                if kind == "delta":
                    self._event(chunk({"content": value}))
                elif kind == "error":  # headers are gone: report it in the stream, as OpenAI does
                    self._event(value.body())
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                else:
                    self._event(chunk({}, value.finish_reason))
                    if request.include_usage:
                        self._event({**chunk({}), "choices": [], "usage": _usage(value)})
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                event = self._next_event(job)
        except CLIENT_GONE:
            job.cancelled.set()  # stop generating for nobody
            log.info("%s: client went away during the stream", job.label)

    def _next_event(self, job: Any) -> tuple[str, Any]:
        """The job's next event. While waiting, and every `POLL_INTERVAL` while events keep coming, checks
        that the client is still connected; if it is gone the job is cancelled and ClientGone raised."""
        while True:
            now = time.monotonic()
            if now - self._polled >= POLL_INTERVAL:
                self._polled = now
                if self._client_gone():
                    job.cancelled.set()  # stop generating for nobody
                    raise ClientGone(f"{job.label}: the client closed the connection")
            try:
                return job.events.get(timeout=POLL_INTERVAL)
            except queue.Empty:
                if not self.server.worker.is_alive():
                    return "error", ApiError(503, "the model worker has stopped", type="server_error")

    _polled = 0.0

    def _client_gone(self) -> bool:
        """Whether the client has closed (or reset) its connection: it is readable and reads as EOF.

        A client that half-closes its side after sending the request (HTTP clients do not) counts as gone.
        Bytes of a pipelined next request do not.
        """
        sock = self.connection
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLPRI)
                ready = bool(poller.poll(0))
            else:
                ready = bool(select.select([sock], [], [], 0)[0])
            if not ready:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError, TimeoutError):
            return False
        except (OSError, ValueError):  # reset, or the socket is closed
            return True

    def _event(self, obj: Any) -> None:
        self.wfile.write(b"data: " + encode_json(obj) + b"\n\n")
        self.wfile.flush()

    # ---------------------------------------------------------------------------------------- responses
    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        if self._unread or self.server.stopping.is_set():
            self.close_connection = True  # the rest of the body would be read as the next request
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self._send(status, encode_json(obj), "application/json", headers)

    def _send_error(self, error: ApiError) -> None:
        headers = {"Allow": error.allowed} if isinstance(error, _MethodNotAllowed) else None
        log.info("%s: %d %s", self.requestline, error.status, error.message)
        try:
            self._send_json(error.status, error.body(), headers)
        except CLIENT_GONE:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (malformed request line or headers, unsupported method,
        header lines too long...) as OpenAI-style JSON too."""
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = "error"
        text = message or reason
        if explain:
            text = f"{text}: {explain}"
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":  # an unparsed request line: answer in 1.1
            self.request_version = self.protocol_version
        error = ApiError(code, text, type="invalid_request_error" if code < 500 else "server_error")
        self._unread = 0
        log.info("%s: %d %s", getattr(self, "requestline", ""), code, text)
        try:
            body = encode_json(error.body())
            self.send_response(code)  # the standard reason phrase: `message` may quote the request line
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except CLIENT_GONE:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


class _MethodNotAllowed(ApiError):
    def __init__(self, allowed: str, method: str, path: str):
        super().__init__(405, f"{method} is not allowed on {path}; use {allowed}", code="method_not_allowed")
        self.allowed = allowed


def _usage(result: Any) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
