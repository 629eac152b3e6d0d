"""Hostile requests against a running server (the fault campaign, marked `hostile`) and a small load test.

Property: whatever the body and headers, the answer is a 200 or a 4xx (never a 5xx, never a dropped
connection); a 4xx carries an OpenAI-style JSON error with a message; and the server still answers a
normal request afterwards. Bodies are valid requests with fields deleted, retyped or replaced (huge,
nested, lone surrogates, NaN, wrong content parts, bad image URLs), random or truncated bytes, and wrong
Content-Length or Content-Type headers. Sizes come from tests/hostile.py (`pytest --hostile-long` for more).
"""

import base64
import copy
import http.client
import json
import socket
import time

import hypothesis
import hypothesis.strategies as st
import pytest

from benchmarks import serve_load
from helpers import served_fixture, serving, solid_png
from hostile import examples
from owl_jax.serve import make_server

pytestmark = pytest.mark.hostile


PNG = solid_png(8, 8, (20, 120, 200))
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
NORMAL = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, processor, _ = served_fixture(tmp_path_factory)
    with serving(make_server(model, processor, port=0, max_new_tokens=2, max_body_bytes=2**20)) as srv:
        yield srv


def exchange(server, payload: bytes | None, headers: dict, *, half_close: bool = False, method="POST"):
    """Send one request as raw bytes on a fresh connection; `(status, headers, body)` of the answer."""
    sock = socket.create_connection(server.server_address[:2], timeout=30)
    try:
        head = f"{method} /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
        for key, value in headers.items():
            for one in value if isinstance(value, list) else [value]:
                head += f"{key}: {one}\r\n"
        sock.sendall(head.encode("latin-1") + b"\r\n" + (payload or b""))
        if half_close:  # a body shorter than announced: let the server see its end
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        sock.close()


def check_answer(status: int, headers: dict, body: bytes) -> None:
    assert status == 200 or 400 <= status < 500, (status, body[:300])
    if status != 200:
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"], body
        return
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        events = body.decode("utf-8").split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""], body[-300:]
        for event in events[:-2]:
            assert "error" not in json.loads(event[len("data: ") :]), event
    else:
        assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"


def still_serving(server) -> None:
    payload = json.dumps(NORMAL).encode()
    status, _, body = exchange(
        server, payload, {"Content-Type": "application/json", "Content-Length": str(len(payload))}
    )
    assert status == 200, body


# ------------------------------------------------------------------------------------------ strategies
BASES = [
    {"messages": [{"role": "user", "content": "hi"}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello there"}]},
        ]
    },
    {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}, {"type": "text", "text": "What?"}],
            }
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    },
]
BAD_IMAGE_URLS = [
    "data:image/png;base64,!!!not base64!!!",
    "data:text/html;base64,PGI+aGk8L2I+",
    "data:image/png;base64," + base64.b64encode(PNG[: len(PNG) // 2]).decode(),  # truncated
    "data:image/png;base64," + base64.b64encode(b"GIF89a" + bytes(20)).decode(),
    "data:image/png,raw",
    "data:;base64,",
    "file:///etc/passwd",
    "/dev/zero",
    "http://127.0.0.1:9/a.png",
    "ftp://x/y.png",
    "javascript:alert(1)",
]
# Odd values. Numbers are a fixed few: every valid sampling option compiles a decoding step of its own.
ODD_TEXT = ["\ud800", "hi \udfff there", "\ud83d", "\udc80\udcff", "", "<image>", "a <image> b", "\x00", "x" * 60_000]
ODD_TEXT += ["é" * 3000, "</s>", "user", "text", "image_url"] + BAD_IMAGE_URLS
ODD_NUMBERS = [None, True, False, 0, -1, 1, 2**63, 10**400, -(10**400), 1e-300, float("nan"), float("inf")]
ODD_NUMBERS += [float("-inf"), "1", -0.5]
ODD_STRUCTURES = [[], {}, [[[[[[]]]]]], [None], [{}], [{"type": "text"}], [{"type": "image_url"}], [{"type": 5}]]
ODD_STRUCTURES += [{"url": 5}, {"type": "text", "text": ["a"]}, {"role": "user"}, {"content": "x"}, [{"text": "x"}]]
ODD_STRUCTURES += [[{"type": "image_url", "image_url": {"url": u}}] for u in BAD_IMAGE_URLS]
ODD_STRUCTURES += [{"url": u} for u in BAD_IMAGE_URLS] + [{"type": "text", "text": t} for t in ODD_TEXT[:4]]
ODD = st.one_of(
    st.sampled_from(ODD_TEXT + ODD_NUMBERS + ODD_STRUCTURES),
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=-1),
    st.recursive(st.none() | st.booleans(), lambda inner: st.lists(inner, max_size=3), max_leaves=8),
)
EXTRA_KEYS = ["top_p", "top_k", "seed", "n", "stop", "stream_options", "max_completion_tokens", "model", "stream", "?"]


def paths(value, prefix=()):
    """Every path to a value inside `value` (dict keys and list indexes), the root excluded."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    out = []
    for key, item in items:
        out.append(prefix + (key,))
        out += paths(item, prefix + (key,))
    return out


def parent_of(body, path):
    for key in path[:-1]:
        body = body[key]
    return body


@st.composite
def mutated_bodies(draw):
    body = json.loads(json.dumps(draw(st.sampled_from(BASES))))
    body.update({"max_tokens": 1, "temperature": 0})
    if draw(st.booleans()):
        body["stream"] = True
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["delete", "replace", "retext", "renumber", "add"]))
        targets = paths(body)
        texts = [p for p in targets if isinstance(parent_of(body, p + (0,)), str)]
        numbers = [p for p in targets if isinstance(parent_of(body, p + (0,)), (int, float))]
        if op == "retext" and texts:  # a string becomes odd text (surrogates, huge, markers, bad URLs)
            path = draw(st.sampled_from(texts))
            parent_of(body, path)[path[-1]] = draw(st.sampled_from(ODD_TEXT))
            continue
        if op == "renumber" and numbers:
            path = draw(st.sampled_from(numbers))
            parent_of(body, path)[path[-1]] = draw(st.sampled_from(ODD_NUMBERS))
            continue
        if op in ("add", "retext", "renumber") or not targets:
            containers = [p for p in targets if isinstance(parent_of(body, p + (0,)), dict)]
            where = draw(st.sampled_from([()] + containers))
            key = draw(st.sampled_from(EXTRA_KEYS)) if where == () else draw(st.sampled_from(["x", "type", "url"]))
            parent_of(body, where + (key,))[key] = copy.deepcopy(draw(ODD))
            continue
        path = draw(st.sampled_from(targets))
        parent = parent_of(body, path)
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(draw(ODD))  # ODD's samples are shared
    return body


@hypothesis.given(case=mutated_bodies())
@examples(40, 2000)
@hypothesis.example(case={**NORMAL, "messages": [{"role": "user", "content": "hi \ud800"}]})
@hypothesis.example(case={**NORMAL, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]})
@hypothesis.example(case={**NORMAL, "messages": [{"role": "user", "content": [{"type": [], "text": "What?"}]}]})
@hypothesis.example(case={**NORMAL, "messages": [{"role": "user", "content": [{"type": {}, "image_url": {}}]}]})
@hypothesis.example(case={**NORMAL, "temperature": 10**400})
@hypothesis.example(case={**NORMAL, "top_k": 2**63, "temperature": 1, "seed": 2**63 - 1})
def test_mutated_bodies_get_a_200_or_a_json_4xx(server, case):
    body = case
    payload = json.dumps(body, allow_nan=True).encode()  # ASCII: lone surrogates become \\ud800 escapes
    status, headers, answer = exchange(
        server, payload, {"Content-Type": "application/json", "Content-Length": str(len(payload))}
    )
    check_answer(status, headers, answer)
    still_serving(server)


CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "",
    None,
]


@st.composite
def raw_requests(draw):
    """`(payload, headers, half_close)`: bodies as bytes and the headers that announce them."""
    valid = json.dumps({**NORMAL, "stream": draw(st.booleans())}).encode()
    kind = draw(st.sampled_from(["bytes", "truncated", "flipped", "nested", "valid"]))
    if kind == "bytes":
        payload = draw(st.binary(max_size=64))
    elif kind == "nested":  # deeper than the JSON parser's recursion limit
        depth = draw(st.sampled_from([999, 5000, 200_000]))
        payload = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == "truncated":
        payload = valid[: draw(st.integers(0, len(valid) - 1))]
    elif kind == "flipped":
        at = draw(st.integers(0, len(valid) - 1))
        payload = valid[:at] + bytes([draw(st.integers(0, 255))]) + valid[at + 1 :]
    else:
        payload = valid
    headers = {}
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers["Content-Type"] = content_type
    length = draw(st.sampled_from(["right", "right", "short", "long", "junk", "two", "none", "chunked"]))
    half_close = False
    if length == "right":
        headers["Content-Length"] = str(len(payload))
    elif length == "short":
        headers["Content-Length"] = str(max(0, len(payload) - draw(st.integers(1, 10))))
    elif length == "long":
        headers["Content-Length"] = str(len(payload) + draw(st.integers(1, 10)))
        half_close = True
    elif length == "junk":
        headers["Content-Length"] = draw(
            st.sampled_from(["abc", "-1", "1e3", "²", " 12x", "0x10", "99999999999999999999"])
        )
    elif length == "two":
        headers["Content-Length"] = [str(len(payload)), str(len(payload) + 1)]
    elif length == "chunked":
        headers["Transfer-Encoding"] = "chunked"
        half_close = True
    return payload, headers, half_close


@hypothesis.given(case=raw_requests())
@examples(30, 1000)
def test_raw_bodies_and_headers_get_a_200_or_a_json_4xx(server, case):
    payload, headers, half_close = case
    status, answer_headers, answer = exchange(server, payload, headers, half_close=half_close)
    check_answer(status, answer_headers, answer)
    still_serving(server)


# ----------------------------------------------------------------------------------------- named cases
@pytest.mark.parametrize(
    "raw,param",
    [
        (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
            "messages[0].content[0].text",
        ),
        (
            b'{"messages": [{"role": "system", "content": "\\ud83d"}, {"role": "user", "content": "hi"}]}',
            "messages[0].content",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\udc80"}', "model"),
    ],
)
def test_lone_surrogates_are_a_400_naming_the_field(server, raw, param):
    status, _, body = exchange(server, raw, {"Content-Type": "application/json", "Content-Length": str(len(raw))})
    assert status == 400, body
    error = json.loads(body)["error"]
    assert error["param"] == param and param in error["message"]


def test_odd_numbers_and_nesting_are_400s(server):
    for raw in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
    ):
        status, _, body = exchange(server, raw, {"Content-Type": "application/json", "Content-Length": str(len(raw))})
        assert status == 400 and json.loads(body)["error"]["message"], body[:300]
    # malformed request lines and headers get JSON errors from the standard library's checks too
    sock = socket.create_connection(server.server_address[:2], timeout=30)
    sock.sendall(b"GARBAGE\r\n\r\n")
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 400 and json.loads(response.read())["error"]["message"]
    sock.close()


@pytest.mark.parametrize(
    "length_header",
    ["Transfer-Encoding: chunked", "Content-Length: abc", None, "Content-Length: 99999999999"],
)
def test_a_refused_body_still_being_sent_gets_the_answer_not_a_reset(server, length_header):
    """The server answers before reading the body; closing with it unread must not reset the connection."""
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += f"{length_header}\r\n" if length_header else ""
    sock = socket.create_connection(server.server_address[:2], timeout=30)
    try:
        sock.sendall(head.encode() + b"\r\n" + b"[" * 400_000)
        time.sleep(0.3)  # a slow client: the server has answered and closed its side by now
        sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method="POST")
        response.begin()
        assert 400 <= response.status < 500 and json.loads(response.read())["error"]["message"]
    finally:
        sock.close()


def test_megabytes_of_text_are_refused_before_tokenizing(server):
    raw = json.dumps({"messages": [{"role": "user", "content": "word " * 200_000}]}).encode()
    start = time.monotonic()
    status, _, body = exchange(server, raw, {"Content-Type": "application/json", "Content-Length": str(len(raw))})
    assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - start < 1  # tokenizing it would take about a second


def test_too_many_images_are_refused_before_decoding(server):
    count = server.context_length // server.processor.image_tokens + 1
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * count
    raw = json.dumps({"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "?"}]}]}).encode()
    status, _, body = exchange(server, raw, {"Content-Type": "application/json", "Content-Length": str(len(raw))})
    assert status == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"


# ------------------------------------------------------------------------------------------------ load
def test_load_with_malformed_requests_loses_nothing(server):
    summary = serve_load.run_load(server.url, requests=60, concurrency=48, malformed=0.1, max_tokens=1, timeout=60)
    assert summary["resets"] == 0 and summary["connection_errors"] == {}, summary
    assert summary["5xx"] == 0 and summary["wrong_answers"] == 0, summary
    assert summary["malformed"] == 6 and summary["alive"], summary
