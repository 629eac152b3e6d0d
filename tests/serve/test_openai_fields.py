"""The OpenAI fields beyond one plain answer: `n` choices, `logprobs` (refused where the worker cannot give
them; rendered from the worker's events), `usage` over choices, and http(s) image URLs from allowed hosts.

One server on the tiny fixture answers the generating tests; references are the same server's answers to
single-choice requests (a choice seeded `seed + i` must equal a request with that seed). The URL tests
serve images from a local `http.server` on 127.0.0.1.
"""

import base64
import http.client
import http.server
import json
import os
import threading
import time
import types

import numpy as np
import pytest

from helpers import FIXTURE, served_fixture, serving, solid_png
from owl_jax.data.processor import OwlProcessor
from owl_jax.inference.generate import GenerationOutput
from owl_jax.serve import make_server
from owl_jax.serve.answers import ChunkStream, Completion
from owl_jax.serve.schema import ChunkChoice, Delta
from owl_jax.serve.worker import Result

MAX_NEW = 4
PNG = solid_png(32, 32, (20, 120, 200))
BIG = b"\x89PNG\r\n\x1a\n" + os.urandom(80_000)  # over the server's 64 KiB body limit
HI = [{"role": "user", "content": "hi"}]


def post(server, body) -> tuple[int, dict | bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.getheader("Content-Type", "").startswith("text/event-stream"):
            events = [e[len("data: ") :] for e in data.decode().split("\n\n") if e]
            return response.status, [e if e == "[DONE]" else json.loads(e) for e in events]
        return response.status, json.loads(data)
    finally:
        conn.close()


def run(server_):
    thread = threading.Thread(target=server_.serve_forever, daemon=True)
    thread.start()
    return server_


class Images(http.server.BaseHTTPRequestHandler):
    """/a.png, /big.png (with and without Content-Length), /slow.png, /elsewhere (a redirect to `localhost`)."""

    hits: list = []

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path == "/slow.png":
            time.sleep(1.5)
        if self.path == "/elsewhere":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/a.png")
            self.end_headers()
            return
        data = BIG if self.path.startswith("/big") else PNG
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path != "/big-unsized.png":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the fetcher stopped reading
            pass
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def images():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, processor, _ = served_fixture(tmp_path_factory)
    options = dict(max_new_tokens=MAX_NEW, max_body_bytes=2**16, allow_url_hosts=("127.0.0.1",), url_timeout=0.5)
    with serving(make_server(model, processor, port=0, **options)) as srv:
        yield srv


# ---------------------------------------------------------------------------------------------- n
def test_n_choices_are_seeded_generations_and_usage_sums_them(server):
    status, greedy = post(server, {"messages": HI, "temperature": 0, "n": 2})
    assert status == 200, greedy
    assert [c["index"] for c in greedy["choices"]] == [0, 1]
    texts = [c["message"]["content"] for c in greedy["choices"]]
    assert texts[0] == texts[1]  # greedy: n equal answers
    one = post(server, {"messages": HI, "temperature": 0})[1]
    assert texts[0] == one["choices"][0]["message"]["content"]
    usage = greedy["usage"]
    assert usage["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counts once
    assert usage["completion_tokens"] == 2 * one["usage"]["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    sample = {"messages": HI, "temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 11}  # as test_server's
    status, both = post(server, {**sample, "n": 2})
    assert status == 200, both
    alone = [post(server, {**sample, "seed": 11 + i})[1]["choices"][0]["message"]["content"] for i in (0, 1)]
    assert [c["message"]["content"] for c in both["choices"]] == alone

    status, events = post(server, {**sample, "n": 2, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    pieces = [(c["choices"][0]["index"], c["choices"][0]["delta"].get("content", "")) for c in chunks]
    assert ["".join(p for index, p in pieces if index == i) for i in (0, 1)] == alone
    assert events[-2]["choices"] == [] and events[-2]["usage"] == both["usage"]


# --------------------------------------------------------------------------------------- logprobs
def test_logprobs_are_refused_by_the_serial_worker_and_with_beams(server):
    processor = OwlProcessor(FIXTURE / "tokenizer.model", image_tokens=9)
    config = types.SimpleNamespace(text=types.SimpleNamespace(max_position_embeddings=2048, vocab_size=1024))
    generator = types.SimpleNamespace(generate=lambda ids, *a, **k: GenerationOutput([[300]], [True], [ids.shape[1]]))
    serial = run(make_server(types.SimpleNamespace(config=config), processor, port=0, slots=0, generator=generator))
    try:
        assert not getattr(serial.worker, "supports_logprobs", False)
        status, body = post(serial, {"messages": HI, "logprobs": True})
        assert status == 400 and body["error"]["param"] == "logprobs" and "--slots" in body["error"]["message"]
    finally:
        serial.shutdown()
        serial.server_close()
    status, body = post(server, {"messages": HI, "logprobs": True, "best_of": 2})
    assert status == 400 and body["error"]["param"] == "logprobs" and "beam" in body["error"]["message"]
    for bad in ({"logprobs": "yes"}, {"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}):
        status, body = post(server, {"messages": HI, **bad})
        assert status == 400 and body["error"]["param"] in bad, body


def test_logprobs_of_a_greedy_answer_are_its_best_tokens(server):
    if not getattr(server.worker, "supports_logprobs", False):
        pytest.skip("the server's worker gives no logprobs (the batching scheduler does)")
    request = {"messages": HI, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    status, body = post(server, request)
    assert status == 200, body
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= body["usage"]["completion_tokens"]
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry["token"] == entry["top_logprobs"][0]["token"] and entry["logprob"] == tops[0]  # greedy
    status, events = post(server, {**request, "stream": True})
    streamed = [e for c in events[:-1] for e in (c["choices"][0]["logprobs"] or {}).get("content") or []]
    assert status == 200 and [e["token"] for e in streamed] == [e["token"] for e in content]
    # the same tokens' numbers, up to float rounding (another batch may hold other rows)
    np.testing.assert_allclose([e["logprob"] for e in streamed], [e["logprob"] for e in content], atol=1e-4)


def test_logprob_events_ride_on_the_chunk_of_their_text():
    """The rendering alone: entries wait for the delta holding their text; held ones go with the last chunk."""
    entry = lambda token: {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}  # noqa: E731
    events = [("logprob", entry("Hel")), ("logprob", entry("lo")), ("delta", "Hello"), ("logprob", entry(" "))]
    events += [("done", Result("length", 7, 3))]
    stream, whole = ChunkStream("id", "m", 1, True, True), Completion("id", "m", 1, True)
    data = stream.start()
    for kind, value in events:
        whole.add(0, kind, value)
        data += stream.event(0, kind, value)
    sent = [e[len("data: ") :] for e in data.decode().split("\n\n") if e]
    sent = [e if e == "[DONE]" else json.loads(e) for e in sent]
    assert sent[-1] == "[DONE]" and stream.finished
    tokens = [[t["token"] for t in c["choices"][0]["logprobs"]["content"]] for c in sent[:-2]]
    assert tokens == [[], ["Hel", "lo"], [" "]] and sent[1]["choices"][0]["delta"] == {"content": "Hello"}
    assert sent[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    body = whole.body()
    assert [t["token"] for t in body["choices"][0]["logprobs"]["content"]] == ["Hel", "lo", " "]
    assert body["choices"][0]["message"]["content"] == "Hello" and body["usage"] == sent[-2]["usage"]


@pytest.mark.parametrize("model", ["m", "owl \ue000owl-text\ue001 twice"])
def test_text_chunks_are_the_schema_chunks(model):
    """A text chunk made from the stream's template is byte for byte the chunk the schema models make."""
    stream = ChunkStream("chatcmpl-1", model, 2, False, False)
    texts = ["Hello", ' a "quote" \\ and \n\t', "日本語 ✓", "", "\ue000owl-text\ue001", "lone \ud800 surrogate"]
    for index in (0, 1):
        for text in texts:
            expected = stream._chunk([ChunkChoice(index=index, delta=Delta(content=text))])
            assert stream.event(index, "delta", text) == expected, (index, text)
    assert json.loads(stream.event(1, "delta", "x")[len("data: ") :])["choices"][0]["delta"] == {"content": "x"}


# ------------------------------------------------------------------------------------------- URLs
def ask(server, url):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}]
    return post(server, {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 2})


def test_image_urls_are_fetched_only_from_allowed_hosts(server, images):
    Images.hits.clear()
    status, fetched = ask(server, f"{images}/a.png")
    assert status == 200, fetched
    inline = ask(server, "data:image/png;base64," + base64.b64encode(PNG).decode())[1]
    assert fetched["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]
    assert Images.hits == ["/a.png"]
    port = images.rsplit(":", 1)[1]
    for url, code, words in (
        (f"http://localhost:{port}/a.png", 400, "allowed hosts (127.0.0.1)"),  # not fetched at all
        (f"{images}/elsewhere", 400, "redirects to other hosts"),
        (f"{images}/big.png", 413, "limit of 65536 bytes"),
        (f"{images}/big-unsized.png", 413, "limit of 65536 bytes"),
        (f"{images}/slow.png", 400, "took more than 0.5 s"),
        (f"ftp://127.0.0.1:{port}/a.png", 400, "does not fetch ftp"),
    ):
        status, body = ask(server, url)
        assert status == code and words in body["error"]["message"], (url, body)
        assert body["error"]["param"] == "messages[0].content[0].image_url"
    assert Images.hits == ["/a.png", "/elsewhere", "/big.png", "/big-unsized.png", "/slow.png"]  # no redirect
