"""The load test's throughput sweep and its mixed/hostile run (`serve_load.py --sweep` and `--hostile`).

Both first serve each fixed prompt (`_serve_stream.PROMPTS`) alone, one at a time: that compiles the
server's programs before anything is timed and gives each prompt's solo answer, which every later greedy
answer must equal, whatever else the server is doing at the time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import random
import threading
import time

from benchmarks._serve_malformed import JSON, Request, send
from benchmarks._serve_stream import PROMPTS, chat, data_url, ms, png, prompt_body, quantile, rss_mib


def solo_answers(host: str, port: int, max_tokens: int, timeout: float, stream: bool, prompts: int) -> list[str]:
    """The first `prompts` fixed prompts served alone, in turn (greedy, `max_tokens`): their answers' text.
    SystemExit at the first that fails (a server that cannot answer one request alone is not worth loading)."""
    texts = []
    for i in range(prompts):
        a = chat(host, port, prompt_body(i, max_tokens, stream), timeout)
        if not a.ok:
            got = f"status {a.status}" if a.status is not None else "no HTTP answer"
            why = ", ".join(x for x in (a.error, a.detail) if x)
            raise SystemExit(f"prompt {i} served alone failed: {got}" + (f" ({why})" if why else ""))
        texts.append(a.text)
    return texts


# ------------------------------------------------------------------------------------------------ sweep
def run_level(
    host: str,
    port: int,
    concurrency: int,
    requests: int,
    seconds: float,
    *,
    max_tokens: int,
    timeout: float,
    reference: list[str],
    stream: bool = True,
) -> dict:
    """`requests` greedy requests of the fixed prompts in turn (streamed, or whole answers with `stream`
    false), `concurrency` clients, each sending its next request when its last one is answered; none starts
    after `seconds`. Returns the row of `sweep_table` (completion tokens and requests per second of wall
    time, percentiles in ms); the i-th sends fixed prompt i mod len(`reference`), whose solo answer
    `reference` holds."""
    counter, lock, answers = itertools.count(), threading.Lock(), []
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                i = next(counter)
            if i >= requests:
                return
            answer = chat(host, port, prompt_body(i % len(reference), max_tokens, stream), timeout)
            with lock:
                answers.append((i, answer))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    good = [a for _, a in answers if a.ok]
    ttft = [a.ttft for a in good if a.ttft is not None]
    gaps = [g for a in good for g in a.gaps]
    tokens = sum(a.completion_tokens for a in good)
    return {
        "concurrency": concurrency,
        "requests": len(answers),
        "tokens": tokens,
        "seconds": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(good) / wall, 2),
        "ttft_p50_ms": ms(quantile(ttft, 0.5)),
        "ttft_p95_ms": ms(quantile(ttft, 0.95)),
        "token_p50_ms": ms(quantile(gaps, 0.5)),
        "token_p95_ms": ms(quantile(gaps, 0.95)),
        "errors": len(answers) - len(good),
        "differ_from_solo": sum(a.ok and a.text != reference[i % len(reference)] for i, a in answers),
    }


def run_sweep(
    host: str,
    port: int,
    levels: list[int],
    *,
    max_tokens: int = 32,
    requests: int | None = None,
    seconds: float = 60.0,
    timeout: float = 120.0,
    prompts: int = len(PROMPTS),
    stream: bool = True,
) -> dict:
    """The throughput sweep: one `run_level` per concurrency in `levels`, after the solo answers and one
    untimed round at the highest concurrency (a busy batch runs programs that lone requests never reach,
    e.g. several decode steps per call: they compile there, not inside a timed level).

    `requests` per level (default max(100, 20 × concurrency)), each level bounded by `seconds` too; the first
    `prompts` fixed prompts (all 16 by default)."""
    reference = solo_answers(host, port, max_tokens, timeout, stream=True, prompts=prompts)
    level = dict(max_tokens=max_tokens, timeout=timeout, reference=reference, stream=stream)
    run_level(host, port, max(levels), 2 * max(levels), seconds, **level)
    rows = []
    for c in levels:
        n = requests if requests is not None else max(100, 20 * c)
        rows.append(run_level(host, port, c, n, seconds, **level))
    return {"mode": "sweep", "max_tokens": max_tokens, "prompts": prompts, "stream": stream, "levels": rows}


SWEEP_COLUMNS = [
    ("concurrency", "concurrency"),
    ("requests", "requests"),
    ("tokens/s", "tokens_per_s"),
    ("requests/s", "requests_per_s"),
    ("TTFT p50 / p95 (ms)", ("ttft_p50_ms", "ttft_p95_ms")),
    ("per-token p50 / p95 (ms)", ("token_p50_ms", "token_p95_ms")),
    ("errors", "errors"),
    ("differ from solo", "differ_from_solo"),
]


def sweep_table(summary: dict) -> str:
    """The sweep as a Markdown table, one row per concurrency."""
    lines = ["| " + " | ".join(name for name, _ in SWEEP_COLUMNS) + " |", "|" + "---:|" * len(SWEEP_COLUMNS)]
    for row in summary["levels"]:
        cells = [
            " / ".join(str(row[k]) for k in key) if isinstance(key, tuple) else str(row[key])
            for _, key in SWEEP_COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ mixed
@dataclasses.dataclass
class Item:
    """One request of the mixed run: a fixed prompt (`prompt` ≥ 0) or a hostile request."""

    kind: str
    prompt: int = -1
    stream: bool = False
    raw: Request | None = None  # a hostile body, sent by `serve_load.send`; must get a 4xx
    disconnect: str | None = None  # a client that goes away (see `_serve_stream.chat`)


def hostile_items(max_tokens: int) -> list[Item]:
    """The hostile requests, in turn: broken JSON, bad images and clients that disconnect."""
    ok = prompt_body(1, max_tokens, False)
    text = json.dumps(ok).encode()

    def image(url: str) -> bytes:
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]
        return json.dumps({**ok, "messages": [{"role": "user", "content": content}]}).encode()

    picture = png(64, 64, lambda x, y: (x * y, 3 * x, 7 * y))
    bad = {
        "JSON cut short": text[: len(text) // 2],
        "truncated PNG": image(data_url(picture[: len(picture) // 2])),
        "PNG claiming 100000x100000": image(data_url(png(100_000, 100_000, lambda x, y: (0, 0, 0), rows=1))),
        "JSON with trailing bytes": text + b"}}",
        "not an image": image(data_url(b"GIF89a? no, just text pretending to be a picture")),
        "JSON not UTF-8": text.replace(b"Write", b"Wr\xffte"),
    }
    items = [Item(kind, raw=Request(kind, body, JSON, True)) for kind, body in bad.items()]
    # Each kind in turn, the clients that go away among them, so that a short run has a few of each.
    items.insert(2, Item("disconnect after the first chunk", prompt=1, stream=True, disconnect="first chunk"))
    items.insert(6, Item("disconnect before the answer", prompt=4, disconnect="sent"))
    return items


def mixed_items(
    requests: int, hostile: float, stream: float, seed: int, max_tokens: int, prompts: int = len(PROMPTS)
) -> list[Item]:
    """`requests` items, `round(requests * hostile)` of them hostile (in turn), shuffled (the same for a seed)."""
    rng = random.Random(seed)
    bad = hostile_items(max_tokens)
    n_bad = round(requests * hostile)
    items = [bad[i % len(bad)] for i in range(n_bad)]
    items += [
        Item("well-formed", prompt=rng.randrange(prompts), stream=rng.random() < stream)
        for _ in range(requests - n_bad)
    ]
    rng.shuffle(items)
    return items


def run_mixed(
    host: str,
    port: int,
    requests: int = 2000,
    concurrency: int = 16,
    hostile: float = 0.1,
    *,
    max_tokens: int = 32,
    stream: float = 0.5,
    seed: int = 0,
    timeout: float = 120.0,
    server_pid: int | None = None,
    rss_from: int = 200,
    max_rss_growth_mib: float = 64.0,
    prompts: int = len(PROMPTS),
) -> dict:
    """The mixed run: solo answers first, then `requests` (a `hostile` fraction hostile) at `concurrency`.

    Checks (`checks`, each True/False/None when not measured): no 5xx; every hostile body refused with a
    4xx; every well-formed request answered and equal to its prompt's solo answer; a normal request answered
    (equal to its solo answer) at the end; the RSS of `server_pid` grown by at most `max_rss_growth_mib`
    from the `rss_from`-th answered request (or the middle one, in shorter runs) to the last. The
    well-formed requests are the first `prompts` fixed prompts (all 16 by default)."""
    reference = solo_answers(host, port, max_tokens, timeout, stream=False, prompts=prompts)
    items = mixed_items(requests, hostile, stream, seed, max_tokens, prompts)
    rss_at = min(rss_from, max(1, requests // 2))
    lock, done, rss, samples = threading.Lock(), [0], {}, []

    def one(item: Item):
        if item.raw is not None:
            outcome = send(host, port, item.raw, timeout)
            result = (outcome.status, outcome.error, outcome)
        else:
            answer = chat(host, port, prompt_body(item.prompt, max_tokens, item.stream), timeout, item.disconnect)
            result = (answer.status, answer.error, answer)
        with lock:
            done[0] += 1
            if done[0] == rss_at:
                rss["from"] = rss_mib(server_pid)
            if server_pid is not None and done[0] % max(1, requests // 10) == 0:  # the trend, for the JSON
                samples.append((done[0], rss_mib(server_pid)))
        return result

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, items))
    wall = time.perf_counter() - start
    rss["to"] = rss_mib(server_pid)
    last = chat(host, port, prompt_body(0, max_tokens, False), timeout)

    statuses = collections.Counter(status for status, _, _ in results if status is not None)
    well = [(it, r[2]) for it, r in zip(items, results) if it.kind == "well-formed"]
    unanswered = [a for _, a in well if not a.ok]
    differ = [it for it, a in well if a.ok and a.text != reference[it.prompt]]
    not_4xx = collections.Counter(it.kind for it, r in zip(items, results) if it.raw and not 400 <= (r[0] or 0) < 500)
    growth = None if rss.get("from") is None or rss.get("to") is None else round(rss["to"] - rss["from"], 1)
    tokens = sum(a.completion_tokens for _, a in well if a.ok)
    checks = {
        "no 5xx": not any(k >= 500 for k in statuses),
        "hostile bodies refused with a 4xx": not not_4xx,
        "well-formed answered": not unanswered,
        "well-formed equal to solo": not differ,
        "alive at the end": last.ok and last.text == reference[0],
        "RSS growth bounded": None if growth is None else growth <= max_rss_growth_mib,
    }
    return {
        "mode": "mixed",
        "requests": requests,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "kinds": dict(sorted(collections.Counter(it.kind for it in items).items())),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "connection_errors": dict(
            collections.Counter(r[1] for it, r in zip(items, results) if r[1] and not it.disconnect)
        ),
        "well_formed": len(well),
        "unanswered": len(unanswered),
        "unanswered_examples": sorted({f"{a.status} {a.error or ''} {a.detail}".strip() for a in unanswered})[:5],
        "differ_from_solo": len(differ),
        "hostile_not_4xx": dict(not_4xx),
        "seconds": round(wall, 1),
        "requests_per_s": round(requests / wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "rss_from_request": rss_at,
        "rss_from_mib": None if rss.get("from") is None else round(rss["from"], 1),
        "rss_to_mib": None if rss.get("to") is None else round(rss["to"], 1),
        "rss_growth_mib": growth,
        "max_rss_growth_mib": max_rss_growth_mib,
        "rss_samples_mib": [(n, None if v is None else round(v, 1)) for n, v in samples],
        "checks": checks,
    }


def mixed_table(s: dict) -> str:
    """The mixed run as a Markdown table, then its checks (PASS, FAIL or not measured)."""
    rss = (
        "not measured"
        if s["rss_growth_mib"] is None
        else (f"{s['rss_from_mib']} → {s['rss_to_mib']} ({s['rss_growth_mib']:+})")
    )
    rows = [
        ("requests (well-formed)", f"{s['requests']} ({s['well_formed']})"),
        ("concurrency", s["concurrency"]),
        ("kinds", ", ".join(f"{k}: {v}" for k, v in s["kinds"].items())),
        ("status counts", ", ".join(f"{k}: {v}" for k, v in s["status_counts"].items()) or "none"),
        ("connection errors", ", ".join(f"{k}: {v}" for k, v in s["connection_errors"].items()) or "none"),
        ("well-formed unanswered", s["unanswered"]),
        ("well-formed differing from solo", s["differ_from_solo"]),
        ("hostile not refused with a 4xx", ", ".join(f"{k}: {v}" for k, v in s["hostile_not_4xx"].items()) or 0),
        ("seconds; requests/s; tokens/s", f"{s['seconds']}; {s['requests_per_s']}; {s['tokens_per_s']}"),
        (f"server RSS, request {s['rss_from_request']} → last (MiB)", rss),
    ]
    if "server_tracebacks" in s:
        rows.append(("server tracebacks; exit status (SIGTERM)", f"{s['server_tracebacks']}; {s['server_exit']}"))
    lines = ["| | |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
    lines += [f"unanswered: {e}" for e in s["unanswered_examples"]]
    verdict = {True: "PASS", False: "FAIL", None: "not measured"}
    lines += [f"check {name}: {verdict[ok]}" for name, ok in s["checks"].items()]
    return "\n".join(lines)
