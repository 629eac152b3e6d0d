"""The server's HTTP/1.1 connections: uvicorn's h11 protocol, closing gracefully and refusing in JSON.

Three things differ from uvicorn's `H11Protocol`:

- **Closing lingers.** The server may answer before it has read a request's body (a 413 for a body over
  the limit, a 400 for a malformed request), and closing a socket whose unread input is not empty makes
  the kernel reset the connection; the reset can destroy the answer before the client reads it. So a
  connection that closes with a request unfinished (or more bytes behind it) first sends its FIN, then
  reads and drops what the client still sends until the client closes too, for at most `linger_seconds`,
  and only then closes. Connections with nothing unread (a request read to its end, or none) close at once.
- **Malformed requests get JSON.** What h11 refuses (a malformed request line or header, conflicting or
  invalid Content-Length, a broken chunked body, headers over `h11_max_incomplete_event_size`, a body that
  ends before its announced length) is answered `400 {"error": {...}}` as every other refusal.
- **Slow requests time out.** A connection whose request has not fully arrived gets `request_timeout`
  seconds between received bytes (uvicorn only times out idle keep-alive connections).

A client that closes its side after sending a whole request is gone: its request is cancelled (uvicorn
reports `http.disconnect`). One whose request was cut short by that end gets the 400.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from owl_jax.serve.answers import encode_json
from owl_jax.serve.errors import ApiError

log = logging.getLogger("owl_jax.serve")


def unread_bytes(sock: Any) -> int:
    """Bytes the kernel has received on `sock` that nobody has read (-1 when it cannot tell)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
    except (OSError, AttributeError, ValueError):
        return -1


class LingeringTransport:
    """A connection's transport whose `close()` lingers (see the module docstring); the rest is the
    transport's own."""

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        seconds: float,
        should_linger: Callable[[], bool],
    ):
        self._transport, self._loop, self._seconds = transport, loop, seconds
        self.should_linger = should_linger  # asked at close(): False for an idle connection
        self.lingering = False  # our FIN is sent; reading and dropping until the client's
        self.eof_received = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        if self.eof_received or not self.should_linger() or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        try:
            self._transport.write_eof()  # after what is buffered has been written
            self._transport.resume_reading()
        except (OSError, RuntimeError):
            self._transport.close()
            return
        self._timer = self._loop.call_later(self._seconds, self.abandon)

    def abandon(self) -> None:
        """Close now, lingering or not."""
        if self._timer is not None:
            self._timer.cancel()
        self._transport.close()


class OwlH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with lingering closes, JSON 400s and a request timeout (module docstring).

    Built by uvicorn as `config.http_protocol_class(config=..., server_state=..., app_state=..., _loop=...)`;
    the server passes `functools.partial(OwlH11Protocol, linger_seconds=..., request_timeout=...)`.
    """

    def __init__(self, *args: Any, linger_seconds: float = 5.0, request_timeout: float = 120.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.linger_seconds, self.request_timeout = linger_seconds, request_timeout
        self._request_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------------- lifecycle
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(LingeringTransport(transport, self.loop, self.linger_seconds, self._unfinished))
        self._arm_request_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.lingering:
            return  # what a closing client still sends is dropped
        super().data_received(data)
        self._arm_request_timer()

    def eof_received(self) -> bool | None:
        self.transport.eof_received = True
        if self.transport.lingering:
            return False  # the client has closed too: close now
        their = self.conn.their_state
        unfinished = their is h11.SEND_BODY or (their is h11.IDLE and self.conn.trailing_data[0])
        if unfinished and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.conn.receive_data(b"")  # h11 now refuses the request cut short: handle_events answers 400
            self.handle_events()
            return True  # keep the connection open to write that answer
        return False  # between requests, or a whole request sent: the client is gone

    def _unfinished(self) -> bool:
        """Whether the client may still be sending: a request not read to its end, bytes received and not
        parsed, or bytes the kernel holds unread."""
        if self.conn.their_state in (h11.SEND_BODY, h11.ERROR) or self.conn.trailing_data[0]:
            return True
        return unread_bytes(self.transport.get_extra_info("socket")) != 0

    # ------------------------------------------------------------------------------------ time limit
    def _arm_request_timer(self) -> None:
        """(Re)start the request timer while the connection waits for the client's request bytes."""
        self._cancel_request_timer()
        responding = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not responding and not self.transport.is_closing():
            self._request_timer = self.loop.call_later(self.request_timeout, self._request_timed_out)

    def _cancel_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if self.transport.is_closing():
            return
        log.info("%s: no request bytes for %.0f s; closing", self.client, self.request_timeout)
        self.transport.close()

    # -------------------------------------------------------------------------------------- refusals
    def send_400_response(self, msg: str) -> None:
        """A request h11 refuses: 400 with an OpenAI-style JSON error, then close."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or self.transport.is_closing():
            self.transport.close()  # an answer is already on its way: nothing more can be said
            return
        error = ApiError(
            400,
            "the request is not valid HTTP/1.1 (a malformed request line or header, an invalid or conflicting "
            "Content-Length, a broken chunked body, headers too long, or a body that ended early)",
        )
        body = encode_json(error.body())
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            out = self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request"))
            out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            self.transport.close()
            return
        self.transport.write(out)
        self.transport.close()
