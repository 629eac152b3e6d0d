"""The load test's well-formed requests and its streaming client: a fixed set of greedy chat prompts (some
with an image as a data URL), one request sent and timed chunk by chunk, and the server's resident memory.

`chat` sends one chat completion on a fresh connection. Streamed answers are read event by event: the time
to the first chunk that carries text, the gaps between the chunks that carry text (the per-token latency a
client sees; a chunk may carry more than one token) and the completion tokens (`usage`, asked for with
`stream_options.include_usage`, else the text chunks counted) are recorded.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import struct
import time
import zlib

from benchmarks._serve_malformed import CHAT, JSON, RESET


def png(width: int, height: int, pixel=lambda x, y: (x, y, 0), rows: int | None = None) -> bytes:
    """A width×height RGB PNG whose pixel (x, y) is `pixel(x, y)`; `rows` < height encodes only that many
    rows (a file whose header claims more pixels than it holds)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(
        b"\0" + bytes(v % 256 for x in range(width) for v in pixel(x, y)) for y in range(min(height, rows or height))
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# The fixed prompts: (text, images). Each image is a small PNG (a gradient, a stripe pattern, ...).
IMAGES = {
    "gradient": png(48, 48, lambda x, y: (5 * x, 5 * y, 128)),
    "stripes": png(40, 56, lambda x, y: (255, 255, 255) if (x // 5) % 2 else (20, 40, 200)),
    "checker": png(64, 32, lambda x, y: (0, 0, 0) if (x // 8 + y // 8) % 2 else (250, 200, 0)),
}
PROMPTS = [
    ("What is in this picture?", ["gradient"]),
    ("Write a short poem about an owl at night.", []),
    ("Describe the colours you see.", ["stripes"]),
    ("Which of the two images is brighter?", ["checker", "gradient"]),
    ("Summarise the plot of a detective story in three sentences.", []),
    ("Explain what a hash table is to a child.", []),
    ("How many squares are there?", ["checker"]),
    ("Translate 'good morning' into French, German and Spanish.", []),
    ("List five things to pack for a camping trip.", []),
    ("Is this a photograph or a drawing?", ["stripes"]),
    ("Why is the sky blue?", []),
    ("Give me a recipe for pancakes.", []),
    ("Tell me a joke about programmers.", []),
    ("What would you call this pattern?", ["gradient"]),
    ("Count from one to ten in words.", []),
    ("hi", []),
]


def prompt_body(index: int, max_tokens: int, stream: bool) -> dict:
    """The body of fixed prompt `index` (mod the number of prompts): a greedy chat completion."""
    text, names = PROMPTS[index % len(PROMPTS)]
    if names:
        parts = [{"type": "image_url", "image_url": {"url": data_url(IMAGES[n])}} for n in names]
        content = parts + [{"type": "text", "text": text}]
    else:
        content = text
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


@dataclasses.dataclass
class Answer:
    """What one request got back. `ok`: a 200 with a whole answer (for a stream: `[DONE]` and no error)."""

    status: int | None = None  # None: no HTTP answer
    error: str | None = None  # "reset", "timeout", "refused", "other", or "stream error" (an error event)
    text: str = ""
    completion_tokens: int = 0
    seconds: float = 0.0
    ttft: float | None = None  # seconds to the first chunk that carries text (streams)
    gaps: list = dataclasses.field(default_factory=list)  # seconds between the chunks that carry text
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and not self.detail


def _read_stream(response: http.client.HTTPResponse, out: Answer, start: float, disconnect: bool) -> None:
    pieces, chunks, last, done = [], 0, None, False
    while True:
        line = response.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            out.error, out.detail = "stream error", str(event["error"].get("message", ""))[:200]
            continue
        if event.get("usage"):
            out.completion_tokens = int(event["usage"].get("completion_tokens", 0))
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if not content:
                continue
            now = time.perf_counter()
            if last is None:
                out.ttft = now - start
            else:
                out.gaps.append(now - last)
            last = now
            pieces.append(content)
            chunks += 1
        if disconnect and pieces:
            return
    out.text = "".join(pieces)
    out.completion_tokens = out.completion_tokens or chunks
    if not done and out.error is None:
        out.detail = "a stream without data: [DONE]"


def chat(host: str, port: int, body: dict, timeout: float, disconnect: str | None = None) -> Answer:
    """Send chat completion `body` on a fresh connection and read the answer (timed, see `Answer`).

    `disconnect`: "first chunk" closes the connection after the first chunk that carries text (streams),
    "sent" closes it as soon as the request is sent, without reading anything.
    """
    out = Answer()
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    response = None
    try:
        conn.request("POST", CHAT, json.dumps(body).encode(), JSON)
        if disconnect == "sent":
            return out
        response = conn.getresponse()
        out.status = response.status
        if response.status != 200:
            response.read()
        elif body.get("stream"):
            _read_stream(response, out, start, disconnect == "first chunk")
        else:
            answer = json.loads(response.read())
            out.text = answer["choices"][0]["message"]["content"]
            out.completion_tokens = int(answer.get("usage", {}).get("completion_tokens", 0))
    except RESET as e:
        out.error, out.detail = "reset", type(e).__name__
    except ConnectionRefusedError:
        out.error = "refused"
    except TimeoutError:
        out.error = "timeout"
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError) as e:
        out.error, out.detail = "other", f"{type(e).__name__}: {e}"[:200]
    finally:
        if response is not None:
            response.close()
        conn.close()
        out.seconds = time.perf_counter() - start
    return out


def quantile(values: list, q: float) -> float | None:
    """The `q` quantile of `values` (linear between the sorted values), or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def rss_mib(pid: int | None) -> float | None:
    """The resident memory (VmRSS) of process `pid` in MiB, from /proc; None without a pid or on failure."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
