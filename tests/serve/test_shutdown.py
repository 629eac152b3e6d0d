"""The server's connection lifecycle: clients that go away, graceful shutdown, the listen backlog, a port in use.

These run a real `OwlServer` with the fixture's processor but a fake generator that emits one token every
`delay` seconds (no model, nothing compiled), so a generation lasts as long as a test needs.
"""

import http.client
import json
import socket
import threading
import time
import types

import numpy as np
import pytest

from helpers import FIXTURE
from owl_jax.data.processor import OwlProcessor
from owl_jax.inference.generate import GenerationOutput
from owl_jax.serve import make_server

TOKEN = 300  # an ordinary piece of the fixture's vocabulary


class FakeGenerator:
    """`Generator.generate`'s interface: `max_new_tokens` tokens, one every `delay` s, streamed as it goes."""

    def __init__(self, delay: float):
        self.delay = delay
        self.started, self.ended = threading.Event(), threading.Event()
        self.calls, self.steps = 0, 0
        self.error = None  # what ended the last generation early (the worker's cancellation)

    def generate(self, input_ids, attention_mask, pixel_values, config, video_pixel_values=None, *, stream=None):
        self.calls += 1
        self.started.set()
        try:
            for step in range(config.max_new_tokens):
                time.sleep(self.delay)
                self.steps += 1
                if stream is not None:
                    stream(step, np.array([TOKEN]), np.array([False]))
            return GenerationOutput([[TOKEN] * config.max_new_tokens], [False], [int(input_ids.shape[1])])
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.ended.set()


FAKE_MODEL = types.SimpleNamespace(
    config=types.SimpleNamespace(text=types.SimpleNamespace(max_position_embeddings=2048, vocab_size=1024))
)


@pytest.fixture(scope="module")
def processor():
    return OwlProcessor(FIXTURE / "tokenizer.model", image_tokens=9)


@pytest.fixture()
def serve(processor):
    """`serve(delay)` → `(server, generator)`: a running server on a free port, stopped after the test."""
    running = []

    def start(delay=0.02, **options):
        generator = FakeGenerator(delay)
        server = make_server(FAKE_MODEL, processor, port=0, generator=generator, max_new_tokens=500, **options)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        running.append((server, thread))
        return server, generator

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(10)


def body(max_tokens, stream=False) -> bytes:
    return json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    ).encode()


def raw_request(server, payload: bytes) -> socket.socket:
    """A connection that has sent one chat request (and nothing more)."""
    sock = socket.create_connection(server.server_address[:2], timeout=30)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def post(server, payload: bytes, results: dict, key: str) -> threading.Thread:
    """POST in a thread; `results[key]` = (status, body bytes) or the exception."""

    def run():
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
            response = conn.getresponse()
            results[key] = (response.status, response.read())
        except Exception as e:
            results[key] = e
        finally:
            conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def open_stream(server, max_tokens):
    """A streamed request whose first content chunk has arrived: `(connection, response)`."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request("POST", "/v1/chat/completions", body(max_tokens, stream=True), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(2):  # the role chunk, then the first piece of text
        assert response.readline().startswith(b"data: {") and response.readline() == b"\n"
    return conn, response


def rest_of_stream(response) -> list:
    events = [e for e in response.read().decode().split("\n\n") if e]
    return [e[len("data: ") :] if e == "data: [DONE]" else json.loads(e[len("data: ") :]) for e in events]


# ------------------------------------------------------------------------------------- clients that leave
def test_disconnect_cancels_a_non_streamed_generation(serve):
    server, generator = serve(delay=0.02)
    sock = raw_request(server, body(400))  # 8 s if it ran to the end
    assert generator.started.wait(10)
    sock.close()
    gone = time.monotonic()
    assert generator.ended.wait(3), "the generation went on after its client left"
    assert time.monotonic() - gone < 1.5 and generator.steps < 400
    assert type(generator.error).__name__ == "_Cancelled"
    # the worker is free again at once
    results = {}
    post(server, body(3), results, "next").join(10)
    assert results["next"][0] == 200


def test_a_request_whose_client_left_while_queued_never_runs(serve):
    server, generator = serve(delay=0.02)
    results = {}
    first = post(server, body(40), results, "first")  # ~0.8 s
    assert generator.started.wait(10)
    queued = raw_request(server, body(40))
    time.sleep(0.3)
    queued.close()  # before the worker takes it
    first.join(10)
    assert results["first"][0] == 200
    deadline = time.monotonic() + 3
    while server.worker.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.worker.pending == 0 and generator.calls == 1


# ------------------------------------------------------------------------------------------- shutdown
def test_shutdown_ends_streams_with_an_error_event_and_refuses_the_rest(serve):
    server, generator = serve(delay=0.02)
    conn, stream = open_stream(server, 400)
    results = {}
    queued = post(server, body(5), results, "queued")  # waits behind the stream
    time.sleep(0.2)
    start = time.monotonic()
    server.shutdown(grace=0.3)
    assert time.monotonic() - start < 3
    events = rest_of_stream(stream)
    conn.close()
    assert events[-1] == "[DONE]" and events[-2]["error"]["message"] == "the server is shutting down"
    assert all("choices" in e for e in events[:-2])
    queued.join(10)
    status, payload = results["queued"]
    assert status == 503 and json.loads(payload)["error"]["type"] == "server_error"
    assert not server.worker.is_alive()
    with pytest.raises(OSError):  # no longer listening
        socket.create_connection(server.server_address[:2], timeout=2).close()


def test_shutdown_lets_requests_finish_within_the_grace_period(serve):
    server, generator = serve(delay=0.02)
    results = {}
    request = post(server, body(25), results, "short")  # ~0.5 s
    assert generator.started.wait(10)
    start = time.monotonic()
    server.shutdown(grace=10)
    assert time.monotonic() - start < 5  # returns once the request is answered, not after the grace
    request.join(10)
    status, payload = results["short"]
    assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] == 25


# ------------------------------------------------------------------------------------ listening socket
def test_listen_backlog_is_128_and_configurable(serve):
    server, _ = serve()
    assert server.request_queue_size == 128
    small, _ = serve(backlog=7)
    assert small.request_queue_size == 7


def test_bad_decode_steps_are_refused(processor, capsys):
    from owl_jax.cli.serve import main

    with pytest.raises(ValueError, match="decode_steps"):
        make_server(FAKE_MODEL, processor, port=0, generator=FakeGenerator(0), decode_steps=0)
    assert main(["--checkpoint", "never-read", "--decode-steps", "0"]) == 2
    assert "--decode-steps must be at least 1" in capsys.readouterr().err


def test_port_in_use_is_an_os_error(serve, processor, capsys):
    from owl_jax.cli.serve import main

    server, _ = serve()
    host, port = server.server_address[:2]
    with pytest.raises(OSError) as caught:  # not an AttributeError from server_close
        make_server(FAKE_MODEL, processor, port=port, generator=FakeGenerator(0))
    assert "in use" in str(caught.value)
    assert main(["--checkpoint", str(FIXTURE / "checkpoint"), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot listen on {host}:{port}: Address already in use"]
