"""The server's HTTP API as a FastAPI app: routes, body limits, and every refusal in OpenAI's error shape.

Routes: `POST /v1/chat/completions` (a JSON `chat.completion`, or server-sent events with `"stream": true`),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (503 once the server is stopping), `GET /` (the
chat page) and `GET /openapi.json` (the schema of `owl_jax.serve.schema`). A wrong method is a 405 with an
`Allow` header and an unknown path a 404, both `{"error": {"message", "type", "param", "code"}}`, as are
validation errors (400), bodies that are not JSON (400) and any bug (500).

A chat request: the body's size is checked before it is read (`Content-Length` over the limit: 413 at
once; a chunked body counted as it arrives: 413 once it passes the limit), a Content-Type other than
`application/json` is a 415 (a cross-site page can post `text/plain` without a CORS preflight); refusals
made before the body was read close the connection. Parsing, validation, media decoding and tokenizing
run in the threadpool (`OwlServer.prepare`), the jobs (one per choice) go to the model worker, and their
events are read on the event loop without blocking it (`owl_jax.serve.events`). A client that
disconnects, while its request waits or while its answer streams, cancels its jobs.

`ServerGate`, around the app, counts the requests in flight (the server's drain waits for their answers
to be written), refuses requests beyond the connection limit (503) and closes connections once the server
is stopping.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from owl_jax.serve.answers import ChunkStream, Completion, encode_json
from owl_jax.serve.errors import ApiError
from owl_jax.serve.events import Notifier, job_events
from owl_jax.serve.page import INDEX_HTML
from owl_jax.serve.schema import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)

if TYPE_CHECKING:
    from owl_jax.serve.server import OwlServer

log = logging.getLogger("owl_jax.serve")

CHAT_PATH = "/v1/chat/completions"
# Only the page's own inline script and style, images and videos from data:/blob: URLs, requests to this server.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
    "media-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'"
)
ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}}


def error_response(error: ApiError, *, close: bool = False, headers: dict | None = None) -> Response:
    """`error` as its JSON response; `close`: end the connection after it (a body may be left unread)."""
    log.info("%d %s", error.status, error.message)
    headers = dict(headers or {})
    if close:
        headers["Connection"] = "close"
    return Response(encode_json(error.body()), error.status, headers, media_type="application/json")


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(encode_json(obj), status, headers, media_type="application/json")


def _param(loc: tuple) -> str | None:
    """A pydantic error location → a `param` such as `messages[0].content`."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "path", "query") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


# ------------------------------------------------------------------------------------------ the body
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused before it is read when its size or type is wrong (ApiError 411, 413, 415),
    and when a chunked body passes `limit` bytes while it arrives (413)."""
    headers = request.headers
    length = headers.get("content-length")  # h11 has checked it is digits, and one value
    if length is None and "chunked" not in headers.get("transfer-encoding", "").lower():
        raise ApiError(411, "a Content-Length header (or a chunked body) is required")
    if length is not None and int(length) > limit:
        raise _too_large(f"{int(length)} bytes", limit)
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        got = headers.get("content-type", "")[:80] or None
        raise ApiError(415, f"send the request as Content-Type: application/json (got {got!r})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit} bytes", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: str, limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is {size}, more than the server's limit of {limit} bytes (--max-body-mb); send "
        "smaller images",
        code="request_too_large",
    )


class ClientWatch:
    """Watches, while a request waits for its jobs, for its client to go away: then `gone` is true, the
    jobs are cancelled and their reader woken. `stop()` ends the watch."""

    def __init__(self, request: Request, jobs: list, notifier: Notifier):
        self.gone = False
        self._task: asyncio.Task | None = asyncio.create_task(self._watch(request, jobs, notifier))

    async def _watch(self, request: Request, jobs: list, notifier: Notifier) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        for job in jobs:
            job.cancelled.set()
        notifier.notify()

    def stop(self) -> None:
        # Let go of the task: its cancellation's traceback holds the watch's frame, which holds this watch;
        # kept here too, that cycle (with the request's jobs and their pixels) would wait for a full garbage
        # collection, which a busy server seldom runs.
        if self._task is not None:
            self._task.cancel()
            self._task = None


# ---------------------------------------------------------------------------------------------- chat
async def chat(server: OwlServer, request: Request) -> Response:
    """One chat completion (see the module docstring)."""
    try:
        data = await read_body(request, server.max_body_bytes)
    except ApiError as e:
        return error_response(e, close=True)  # what the body still holds is not read
    if server.stopping.is_set():
        raise ApiError(503, "the server is shutting down", type="server_error")
    notifier = Notifier(server.doorbell(asyncio.get_running_loop()))
    prepared = await run_in_threadpool(server.prepare, data, notifier.queue)
    body, jobs = prepared.request, prepared.jobs
    try:
        for job in jobs:
            server.worker.submit(job)
    except ApiError:
        for job in jobs:
            job.cancelled.set()
        raise
    watch = ClientWatch(request, jobs, notifier)
    events = job_events(jobs, notifier, server.worker.is_alive, stop=lambda: watch.gone)
    try:
        if not body.stream:
            completion = Completion(prepared.label, server.model_name, body.n, body.logprobs)
            try:
                async for batch in events:
                    for index, kind, value in batch:
                        completion.add(index, kind, value)
            except ApiError:
                for job in jobs:
                    job.cancelled.set()
                raise
            return Response() if watch.gone else json_response(completion.body())
        # Wait for the first event before answering, so a failure before any text still gets a real status.
        first = await anext(events, None)
        if first is None:  # the client went away
            return Response()
        if first[0][1] == "error":
            for job in jobs:
                job.cancelled.set()
            raise first[0][2]
    finally:
        watch.stop()  # a streamed answer's client is watched by StreamingResponse from here on
    stream = ChunkStream(prepared.label, server.model_name, body.n, body.logprobs, body.include_usage)
    return StreamingResponse(
        _sse(stream, first, events, jobs),
        media_type="text/event-stream; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
    )


async def _sse(stream: ChunkStream, first: list, events: Any, jobs: list) -> Any:
    """The server-sent events of a streamed answer, one write per batch of events; a client gone (the
    response is cancelled) or an error cancels the jobs still running."""
    try:
        yield stream.start()
        batch = first
        while True:
            out = []
            for event in batch:
                out.append(stream.event(*event))
                if stream.finished:
                    break
            if any(out):
                yield b"".join(out)
            if stream.finished:
                return
            batch = await anext(events, None)
            if batch is None:
                return
    finally:
        for job, choice in zip(jobs, stream.choices):
            if choice.result is None:
                job.cancelled.set()
        if not stream.finished:
            log.info("%s: the client went away during the stream", stream.label)


# ----------------------------------------------------------------------------------------------- app
def build_app(server: OwlServer) -> FastAPI:
    """The FastAPI app serving `server` (an `OwlServer`: its model, worker and limits)."""
    app = FastAPI(
        title="mPLUG-Owl",
        summary="An OpenAI-compatible chat API for mPLUG-Owl (owl_jax)",
        docs_url=None,  # the interactive docs load scripts from the internet; the schema is /openapi.json
        redoc_url=None,
        redirect_slashes=False,
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        method, path = request.method, request.url.path
        if error.status_code == 404:
            message = f"no such endpoint: {method} {path}; see GET /v1/models, POST {CHAT_PATH}, GET /health and GET /"
            return error_response(ApiError(404, message, code="not_found"))
        if error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"{method} is not allowed on {path}; use {allowed}"
            return error_response(ApiError(405, message, code="method_not_allowed"), headers={"Allow": allowed})
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(ApiError(error.status_code, str(error.detail), type=kind), headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        first = (error.errors() or [{}])[0]
        param = _param(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        return error_response(ApiError(400, message, param=param))

    @app.post(
        CHAT_PATH,
        responses={200: {"model": ChatCompletion, "description": "the answer, or server-sent events"}, **ERRORS},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}},
    )
    async def chat_completions(request: Request) -> Response:
        try:
            return await chat(server, request)
        except ApiError as e:
            return error_response(e, close=server.stopping.is_set())
        except ClientDisconnect:
            return Response()  # nobody to answer
        except Exception as e:  # a bug: answer 500 rather than dropping the connection
            log.exception("unexpected error handling %s %s", request.method, request.url.path)
            return error_response(ApiError(500, f"internal server error: {type(e).__name__}", type="server_error"))

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> Response:
        return json_response(server.models())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def model(model_id: str) -> Response:
        if model_id != server.model_name:
            message = f"the model {model_id!r} does not exist; this server serves {server.model_name!r}"
            raise ApiError(404, message, code="model_not_found")
        return json_response(server.model_card())

    @app.get("/health", response_model=Health, responses=ERRORS)
    async def health() -> Response:
        stopping = server.stopping.is_set()
        return json_response({"status": "stopping" if stopping else "ok"}, 503 if stopping else 200)

    page_headers = {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    @app.get("/index.html", include_in_schema=False)
    async def page() -> Response:
        return Response(INDEX_HTML.encode("utf-8"), 200, page_headers, media_type="text/html; charset=utf-8")

    def openapi() -> dict:
        """The schema, with the chat request's body from `schema.ChatCompletionRequest`."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            ref = "#/components/schemas/{model}"
            body = ChatCompletionRequest.model_json_schema(ref_template=ref)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["ChatCompletionRequest"] = body
            content = schema["paths"][CHAT_PATH]["post"]["requestBody"]["content"]
            content["application/json"]["schema"] = {"$ref": ref.format(model="ChatCompletionRequest")}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class ServerGate:
    """The ASGI app around the FastAPI app: counts requests in flight, refuses requests beyond the
    server's connection limit (503 JSON), adds `Connection: close` once the server is stopping, and sends
    header names in their usual capitalization (`Content-Type`; ASGI's are lower case, which HTTP allows
    but naive clients do not expect)."""

    def __init__(self, app: FastAPI, server: OwlServer):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = self.server

        async def send_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k.title(), v) for k, v in message.get("headers", [])]
                if server.stopping.is_set():
                    headers = [(k, v) for k, v in headers if k != b"Connection"] + [(b"Connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        server.request_started()
        try:
            limit = server.max_connections
            if limit is not None and server.open_connections() > limit:
                message = f"the server has more than {limit} connections open (--max-connections)"
                error = ApiError(503, message, type="server_error", code="too_many_connections")
                return await error_response(error, close=True)(scope, receive, send_headers)
            await self.app(scope, receive, send_headers)
        finally:
            server.request_finished()
