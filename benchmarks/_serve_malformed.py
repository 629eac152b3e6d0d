"""The load test's default mode: many connections, some of them malformed (`serve_load.py` without
`--sweep` or `--hostile`). Each malformed request must get a 4xx with a JSON error message, each valid one a
200 with a whole answer; `run_load` counts resets, statuses and wrong answers, and times the answers.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import http.client
import ipaddress
import json
import random
import statistics
import time
import urllib.parse

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
PNG_1x1 = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


@dataclasses.dataclass
class Request:
    """One request to send: `body` bytes (or None), headers, whether the server must refuse it (4xx)."""

    kind: str
    body: bytes | None
    headers: dict
    malformed: bool
    method: str = "POST"
    path: str = CHAT
    content_length: int | None = None  # a wrong Content-Length to announce (the body is still sent whole)


def valid_body(max_tokens: int, stream: bool, text: str = "hi") -> dict:
    return {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def malformed_requests(max_tokens: int) -> list[Request]:
    """The hostile requests the load mixes in; each must get a 4xx."""

    def body(obj) -> bytes:
        return json.dumps(obj).encode()

    ok = valid_body(max_tokens, False)
    user = lambda content: {**ok, "messages": [{"role": "user", "content": content}]}  # noqa: E731
    image = lambda url: user([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}])  # noqa: E731
    out = [
        Request("invalid JSON", b'{"messages": [', JSON, True),
        Request("not UTF-8", b'{"messages": "\xff\xfe"}', JSON, True),
        Request("lone surrogate", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', JSON, True),
        Request("deep nesting", b"[" * 50_000 + b"]" * 50_000, JSON, True),
        Request(
            "NaN temperature", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', JSON, True
        ),
        Request("huge integer", body({**ok, "temperature": 10**400}), JSON, True),
        Request("negative max_tokens", body({**ok, "max_tokens": -1}), JSON, True),
        Request("top_p 0", body({**ok, "top_p": 0}), JSON, True),
        Request("messages missing", body({"max_tokens": max_tokens}), JSON, True),
        Request("messages a string", body({**ok, "messages": "hi"}), JSON, True),
        Request("content a number", body(user(5)), JSON, True),
        Request("part type wrong", body(user([{"type": "audio", "audio": "x"}])), JSON, True),
        Request("part not an object", body(user(["hi"])), JSON, True),
        Request("role unknown", body({**ok, "messages": [{"role": "robot", "content": "hi"}]}), JSON, True),
        Request("body an array", body([ok]), JSON, True),
        Request("image not base64", body(image("data:image/png;base64,@@@")), JSON, True),
        Request("image not an image", body(image("data:image/png;base64,aGVsbG8=")), JSON, True),
        Request("image over http", body(image("http://127.0.0.1/a.png")), JSON, True),
        Request("image local path", body(image("/etc/passwd")), JSON, True),
        Request("wrong Content-Type", body(ok), {"Content-Type": "text/plain"}, True),
        Request("no Content-Type", body(ok), {}, True),
        Request("Content-Length too small", body(ok), JSON, True, content_length=5),
        Request("Content-Length not a number", body(ok), {**JSON, "Content-Length": "lots"}, True),
        Request("unknown model", body({**ok, "model": "gpt-4"}), JSON, True),
        Request("GET on chat", None, {}, True, method="GET"),
        Request("unknown path", body(ok), JSON, True, path="/v1/nothing"),
    ]
    return out


def make_requests(n: int, malformed: float, max_tokens: int, stream: float, seed: int) -> list[Request]:
    """`n` requests, `round(n * malformed)` of them hostile, in a shuffled order (the same for a seed)."""
    rng = random.Random(seed)
    bad = malformed_requests(max_tokens)
    n_bad = round(n * malformed)
    out = [bad[i % len(bad)] for i in range(n_bad)]
    for i in range(n - n_bad):
        streamed = rng.random() < stream
        with_image = i % 10 == 0
        obj = valid_body(max_tokens, streamed)
        if with_image:
            obj["messages"][0]["content"] = [
                {"type": "image_url", "image_url": {"url": PNG_1x1}},
                {"type": "text", "text": "What is this?"},
            ]
        kind = ("streamed" if streamed else "plain") + (" + image" if with_image else "")
        out.append(Request(kind, json.dumps(obj).encode(), JSON, False))
    rng.shuffle(out)
    return out


@dataclasses.dataclass
class Outcome:
    request: Request
    status: int | None = None  # None: no HTTP answer
    error: str | None = None  # "reset", "timeout", "refused" or another connection error
    seconds: float = 0.0
    detail: str = ""


RESET = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)


def send(host: str, port: int, request: Request, timeout: float) -> Outcome:
    """Send one request on a fresh connection and read the whole answer."""
    out = Outcome(request)
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(request.method, request.path, skip_accept_encoding=True)
        headers = dict(request.headers)
        if request.body is not None and "Content-Length" not in headers:
            length = request.content_length if request.content_length is not None else len(request.body)
            headers["Content-Length"] = str(length)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders(request.body)
        response = conn.getresponse()
        data = response.read()
        out.status = response.status
        if 400 <= response.status < 500:
            try:
                message = json.loads(data)["error"]["message"]
                if not isinstance(message, str) or not message:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                out.detail = "a 4xx without a JSON error message"
        elif response.status == 200 and request.path == CHAT:
            text = data.decode("utf-8", "replace")
            if not text.startswith("data: "):
                if "choices" not in json.loads(data):
                    out.detail = "a 200 without choices"
            elif not text.endswith("data: [DONE]\n\n"):
                out.detail = "a stream without data: [DONE]"
            elif '\ndata: {"error"' in "\n" + text:
                out.detail = "a stream that ended in an error"
    except RESET as e:
        out.error, out.detail = "reset", type(e).__name__
    except ConnectionRefusedError:
        out.error = "refused"
    except TimeoutError:
        out.error = "timeout"
    except (OSError, http.client.HTTPException, ValueError) as e:
        out.error, out.detail = "other", f"{type(e).__name__}: {e}"
    finally:
        conn.close()
        out.seconds = time.perf_counter() - start
    return out


def alive(host: str, port: int, timeout: float, max_tokens: int) -> bool:
    """Whether the server answers /health and a normal chat request."""
    health = send(host, port, Request("health", None, {}, False, method="GET", path="/health"), timeout)
    chat = send(host, port, Request("plain", json.dumps(valid_body(max_tokens, False)).encode(), JSON, False), timeout)
    return health.status == 200 and chat.status == 200


def loopback(url: str) -> tuple[str, int]:
    """`(host, port)` of `url`; SystemExit unless it names this machine: `localhost` or a loopback address
    (127.0.0.0/8, ::1). Names are not looked up."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port or 80
        local = host == "localhost" or (host is not None and ipaddress.ip_address(host).is_loopback)
    except ValueError:  # not an IP address, or a port out of range
        local = False
    if not local:
        raise SystemExit(f"--url must name a loopback address (127.0.0.0/8, ::1 or localhost), got {url!r}")
    return host, port


def run_load(
    url: str,
    requests: int = 1000,
    concurrency: int = 48,
    malformed: float = 0.1,
    *,
    max_tokens: int = 2,
    stream: float = 0.2,
    seed: int = 0,
    timeout: float = 60.0,
    warmup: bool = True,
) -> dict:
    """Send the load to the server at `url`; returns the summary `report` prints.

    With `warmup`, one valid request of each kind (plain, streamed, with an image) is sent first and not
    counted, so that the latencies are not those of the server compiling its programs."""
    host, port = loopback(url)
    todo = make_requests(requests, malformed, max_tokens, stream, seed)
    if warmup:  # one valid request of each kind first, untimed: the server compiles its programs on first use
        for kind in sorted({r.kind for r in todo if not r.malformed}):
            send(host, port, next(r for r in todo if r.kind == kind), timeout)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda r: send(host, port, r, timeout), todo))
    wall = time.perf_counter() - start
    statuses = collections.Counter(o.status for o in outcomes if o.status is not None)
    errors = collections.Counter(o.error for o in outcomes if o.error is not None)
    wrong = [
        o
        for o in outcomes
        if o.status is not None
        and (
            o.detail
            or (o.request.malformed and not 400 <= o.status < 500)
            or (not o.request.malformed and o.status != 200)
        )
    ]
    answered = sorted(o.seconds for o in outcomes if o.status is not None)
    q = statistics.quantiles(answered, n=100, method="inclusive") if len(answered) > 1 else answered * 99
    return {
        "url": url,
        "requests": requests,
        "concurrency": concurrency,
        "malformed": sum(r.malformed for r in todo),
        "resets": errors.get("reset", 0),
        "connection_errors": dict(errors),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "5xx": sum(v for k, v in statuses.items() if k >= 500),
        "wrong_answers": len(wrong),
        "wrong_examples": sorted({f"{o.request.kind}: {o.status} {o.detail}".strip() for o in wrong})[:10],
        "p50_ms": round(1000 * q[49], 1) if q else None,
        "p99_ms": round(1000 * q[98], 1) if q else None,
        "requests_per_s": round(requests / wall, 1),
        "alive": alive(host, port, timeout, max_tokens),
    }


def report(summary: dict) -> str:
    """The summary as a small Markdown table (plus the wrong answers, if any)."""
    statuses = ", ".join(f"{k}: {v}" for k, v in summary["status_counts"].items()) or "none"
    errors = ", ".join(f"{k}: {v}" for k, v in summary["connection_errors"].items()) or "none"
    rows = [
        ("requests (malformed)", f"{summary['requests']} ({summary['malformed']})"),
        ("concurrency", summary["concurrency"]),
        ("connection resets", summary["resets"]),
        ("connection errors", errors),
        ("status counts", statuses),
        ("5xx", summary["5xx"]),
        ("wrong answers", summary["wrong_answers"]),
        ("latency p50 / p99 (ms)", f"{summary['p50_ms']} / {summary['p99_ms']}"),
        ("requests/s", summary["requests_per_s"]),
        ("alive afterwards", "yes" if summary["alive"] else "NO"),
    ]
    if "server_tracebacks" in summary:
        rows.append(("server tracebacks", summary["server_tracebacks"]))
        rows.append(("server exit status (SIGTERM)", summary["server_exit"]))
    lines = ["| | |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
    for example in summary["wrong_examples"]:
        lines.append(f"wrong: {example}")
    return "\n".join(lines)
