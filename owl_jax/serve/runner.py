"""uvicorn on a thread of its own, on a socket bound beforehand, stopped in steps.

`OwlServer` binds its listening socket when it is built (so port 0 works and its URL is known before it
serves) and hands it to uvicorn. The event loop runs on its own thread, so that the owner's thread can
wait in `serve_forever` and go on to drain the server while the loop still writes the last answers:
`close_listener()` stops accepting connections, `stop()` ends uvicorn (connections still open are closed
after `graceful_seconds`, the loop ends, the thread is joined). uvicorn handles no signals here; the
owner decides what a signal means (`owl_jax.cli.serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from owl_jax.serve.connection import OwlH11Protocol

log = logging.getLogger("owl_jax.serve")
H11_MAX_HEADER_BYTES = 64 * 1024  # a request line and headers longer than this get a 400


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket listening on `host:port` (port 0: any free port) with a queue of `backlog` connections.

    OSError when the address cannot be bound (e.g. "Address already in use").
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server without signal handling, recording its loop and when it has started."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        for connection in list(self.server_state.connections):  # still lingering after the graceful wait
            connection.transport.abandon()
        await asyncio.sleep(0)  # let the transports close

    def close_listeners(self) -> None:
        for server in getattr(self, "servers", []):
            server.close()


class UvicornThread:
    """Serves `app` on `sock` with uvicorn, on a daemon thread.

    Args:
      app: the ASGI app.
      sock: a listening socket (`bind`); uvicorn closes it when it stops.
      backlog: the listen queue (applied again when uvicorn starts listening).
      linger_seconds, request_timeout: `OwlH11Protocol`'s.
      keep_alive_seconds: how long an idle keep-alive connection stays open.
      graceful_seconds: how long `stop` lets open connections finish before closing them.
    """

    def __init__(
        self,
        app: Any,
        sock: socket.socket,
        *,
        backlog: int,
        linger_seconds: float,
        request_timeout: float,
        keep_alive_seconds: float,
        graceful_seconds: float = 1.0,
    ):
        protocol = functools.partial(OwlH11Protocol, linger_seconds=linger_seconds, request_timeout=request_timeout)
        config = uvicorn.Config(
            app,
            http=protocol,  # type: ignore[arg-type]
            ws="none",
            loop="asyncio",
            lifespan="off",
            log_config=None,  # the process's logging stays as it is
            proxy_headers=False,  # no X-Forwarded-For from anyone
            server_header=False,
            headers=[("server", "owl-jax-serve")],
            backlog=backlog,
            timeout_keep_alive=keep_alive_seconds,  # type: ignore[arg-type]
            timeout_graceful_shutdown=graceful_seconds,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES,
        )
        self.sock = sock
        self.server = _Server(config)
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def open_connections(self) -> int:
        return len(self.server.server_state.connections)

    def start(self, timeout: float = 30.0) -> None:
        """Start serving (once); returns when uvicorn listens, or raises RuntimeError if it could not start."""
        with self._lock:
            if self.thread is not None or self._stopped:
                return
            self.thread = threading.Thread(target=self._run, name="owl-serve-http", daemon=True)
            self.thread.start()
        if not self.server.ready.wait(timeout) or not self.server.started:
            raise RuntimeError("the HTTP server did not start (see the log)")

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException:  # SystemExit from uvicorn's startup, or a bug: logged, and the thread ends
            log.exception("the HTTP server stopped unexpectedly")
        finally:
            self.server.ready.set()

    def is_alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def close_listener(self, timeout: float = 5.0) -> None:
        """Stop accepting connections (the ones open keep being served); returns once the socket is closed."""
        loop = self.server.loop
        if self.is_alive() and self.server.ready.wait(timeout) and loop is not None:

            async def close() -> None:
                self.server.close_listeners()

            try:
                asyncio.run_coroutine_threadsafe(close(), loop).result(timeout)
            except (RuntimeError, TimeoutError, asyncio.CancelledError):  # the loop has just ended
                pass
        with self._lock:
            if self.thread is None:  # never served: nobody else owns the socket
                self.sock.close()

    def stop(self, timeout: float = 10.0) -> None:
        """End uvicorn: open connections get `graceful_seconds` to finish, then are closed; joins the thread."""
        with self._lock:
            self._stopped = True
            thread = self.thread
        self.server.should_exit = True
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.sock.close()
