#!/usr/bin/env python
"""Load test of the HTTP server: throughput under concurrency, and many connections, some of them hostile.

    python benchmarks/serve_load.py [--url http://127.0.0.1:8000] [--requests 1000] [--concurrency 48]
        [--malformed 0.1] [--max-tokens 2] [--stream 0.2] [--seed 0] [--json results.json]
    python benchmarks/serve_load.py --sweep 1,4,16,32 [--requests N] [--seconds 60] [--max-tokens 32]
    python benchmarks/serve_load.py --hostile 0.1 [--requests 2000] [--concurrency 16] [--max-tokens 32]
        [--stream 0.5] [--server-pid PID] [--rss-from 200] [--max-rss-growth-mib 64]

Without `--url` it starts `owl-serve` (`python -m owl_jax.serve`, with `--slots`, default 16, and
`--decode-steps`, default 4) on the tiny reference fixture in a subprocess on a free port, and stops it
with SIGTERM at the end. Only loopback addresses are accepted for `--url`. Every run is bounded: a number
of requests, each with a `--timeout`.

Malformed requests (the default mode): each request opens its own connection (`--concurrency` at a
time); a `--malformed` fraction of them are hostile (invalid JSON, wrong types, lone surrogates, deep
nesting, wrong Content-Type or Content-Length, bad image URLs, ...) and must get a 4xx; the others are
short greedy chat completions (a `--stream` fraction of them streamed) and must get a 200. It prints one
table: connection resets, other connection errors, status counts, 5xx, answers of the wrong kind (a 4xx
for a valid request or a 2xx for a malformed one), p50/p99 latency, and whether the server still answers
a normal request afterwards (and, when it started the server, the server's tracebacks and exit status).

Throughput (`--sweep 1,4,16,32`): 16 fixed greedy prompts (some with images as data URLs), streamed,
`--max-tokens` each, are first served alone in turn (untimed: the server compiles its programs; their
answers are the solo answers), then twice the highest concurrency's worth of requests at that
concurrency, also untimed (a busy batch's programs compile). Then, for each concurrency of the sweep,
that many clients send the
prompts in turn, each its next request once its last is answered: `--requests` per concurrency (default
max(100, 20 × concurrency)), none started after `--seconds`. One table row per concurrency: requests,
completion tokens/s and answered requests/s (of the level's wall time), p50/p95 time to the first text
chunk, p50/p95 time between text chunks (the per-token latency a client sees), errors, and answers that
differ from the solo ones. Exits 1 if any request failed or differed. `--stream 0` sends the same requests
unstreamed (whole answers: no time to first chunk or between chunks).

Mixed and hostile (`--hostile 0.1`): the fixed prompts are served alone first (their solo answers); then
`--requests` requests at `--concurrency`, a `--hostile` fraction of them hostile in turn (JSON cut short,
with trailing bytes or not UTF-8, a truncated PNG, a PNG claiming 100000×100000 pixels, a non-image; and
clients that disconnect after the first streamed chunk or right after sending), the rest the fixed
prompts (a `--stream` fraction streamed). Checks: no 5xx; every hostile body refused with a 4xx; every
well-formed request answered, with its prompt's solo answer; a normal request answered at the end; and
the server's RSS (VmRSS from /proc, of the server it started, or of `--server-pid`; not measured with
`--url` alone) grown by at most `--max-rss-growth-mib` from the `--rss-from`-th answered request to the
last. Prints a table and the checks, and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The default mode lives in its own module; its names stay importable from here.
from benchmarks import _serve_modes as modes  # noqa: E402
from benchmarks._serve_malformed import (  # noqa: E402
    CHAT,
    JSON,
    Outcome,
    Request,
    alive,
    loopback,
    make_requests,
    malformed_requests,
    report,
    run_load,
    send,
    valid_body,
)

__all__ = [
    "CHAT",
    "JSON",
    "Outcome",
    "Request",
    "TinyServer",
    "alive",
    "loopback",
    "main",
    "make_requests",
    "malformed_requests",
    "report",
    "run_load",
    "send",
    "valid_body",
]
FIXTURE = os.path.join(REPO, "tests", "fixtures", "mplug_owl_tiny")


class TinyServer:
    """`python -m owl_jax.serve` on a copy of the tiny fixture, on a free port; its stderr is drained."""

    def __init__(
        self,
        checkpoint: str | None,
        max_new_tokens: int,
        slots: int = 16,
        decode_steps: int = 4,
        startup_timeout: float = 300.0,
    ):
        self.folder = tempfile.mkdtemp(prefix="serve_load_")
        if checkpoint is None:
            checkpoint = os.path.join(self.folder, "owl-tiny")
            shutil.copytree(os.path.join(FIXTURE, "checkpoint"), checkpoint)
            shutil.copy(os.path.join(FIXTURE, "tokenizer.model"), checkpoint)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "owl_jax.serve", "--checkpoint", checkpoint, "--port", "0"]
            + ["--max-new-tokens", str(max_new_tokens), "--shutdown-grace", "2", "--slots", str(slots)]
            + ["--decode-steps", str(decode_steps)],
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
        self.tracebacks = 0
        self.url = None
        ready = threading.Event()

        def drain() -> None:  # read the log (a full pipe would block the server) and watch for tracebacks
            for line in self.proc.stderr:
                if line.startswith("Traceback"):
                    self.tracebacks += 1
                if self.url is None and " on http://" in line:
                    self.url = line.split(" on ", 1)[1].split()[0]
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(startup_timeout) or self.url is None:
            self.stop()
            raise SystemExit("the server did not start (see its log above)")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.proc.returncode


def parse_levels(text: str) -> list[int]:
    """`--sweep` "1,4,16,32" → [1, 4, 16, 32] (argparse type: positive integers, comma-separated)."""
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return levels


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (loopback only); default: start one on the fixture")
    p.add_argument("--checkpoint", default=None, help="the checkpoint of the started server (default: tiny fixture)")
    p.add_argument("--sweep", type=parse_levels, default=None, help="throughput at these concurrencies, e.g. 1,4,16")
    p.add_argument("--hostile", type=float, default=None, help="the mixed run, with this fraction hostile (0.1)")
    p.add_argument("--requests", type=int, default=None, help="requests (default 1000; --hostile 2000; see --sweep)")
    p.add_argument("--concurrency", type=int, default=None, help="connections at a time (48; --hostile 16)")
    p.add_argument("--malformed", type=float, default=None, help="fraction of malformed requests (default 0.1)")
    p.add_argument(
        "--stream", type=float, default=None, help="fraction of valid requests streamed (0.2; --hostile 0.5)"
    )
    p.add_argument(
        "--max-tokens", type=int, default=None, help="max_tokens of valid requests (2; --sweep, --hostile 32)"
    )
    p.add_argument("--seconds", type=float, default=60.0, help="--sweep: no request starts after this, per level")
    p.add_argument(
        "--timeout", type=float, default=None, help="seconds one request may take (60; --sweep, --hostile 120)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true", help="default mode: time the first requests too")
    p.add_argument("--slots", type=int, default=16, help="the started server's --slots (16; 0: one request at a time)")
    p.add_argument("--decode-steps", type=int, default=4, help="the started server's --decode-steps (4)")
    p.add_argument("--server-pid", type=int, default=None, help="--hostile with --url: the server process, for RSS")
    p.add_argument("--rss-from", type=int, default=200, help="--hostile: RSS growth from this answered request (200)")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0, help="--hostile: the RSS check's bound (64)")
    p.add_argument("--json", default=None, help="also write the summary here")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse contradictory or out-of-range flags (exit 2), then fill in each mode's defaults."""
    if args.sweep is not None and args.hostile is not None:
        p.error("--sweep and --hostile are separate runs; give one of them")
    if args.malformed is not None and (args.sweep is not None or args.hostile is not None):
        p.error("--malformed belongs to the default mode; --hostile sets the hostile fraction of the mixed run")
    if args.sweep is not None and args.concurrency is not None:
        p.error("--sweep sets the concurrencies; drop --concurrency")
    if args.sweep is not None and args.stream not in (None, 0, 1):
        p.error("--sweep streams every request (--stream 1, the default) or none (--stream 0)")
    if args.url is not None:
        try:
            loopback(args.url)
        except SystemExit as e:
            p.error(str(e))
    if args.server_pid is not None and not os.path.exists(f"/proc/{args.server_pid}/status"):
        p.error(f"--server-pid: no process {args.server_pid} (or no /proc to read its memory from)")
    new_mode = args.sweep is not None or args.hostile is not None
    mixed = args.hostile is not None
    defaults = {
        "requests": 2000 if mixed else None if args.sweep else 1000,
        "concurrency": 16 if mixed else 48,
        "malformed": 0.1,
        "stream": 0.5 if mixed else 1.0 if args.sweep else 0.2,
        "max_tokens": 32 if new_mode else 2,
        "timeout": 120.0 if new_mode else 60.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    fractions = [args.malformed, args.stream] + ([args.hostile] if mixed else [])
    if (args.requests is not None and args.requests < 1) or args.concurrency < 1 or args.max_tokens < 1:
        p.error("--requests, --concurrency and --max-tokens must be positive")
    if not all(0 <= f <= 1 for f in fractions):
        p.error("--malformed, --stream and --hostile must be in [0, 1]")
    if args.seconds <= 0 or args.timeout <= 0 or args.rss_from < 1 or args.max_rss_growth_mib < 0:
        p.error("--seconds, --timeout and --rss-from must be positive, --max-rss-growth-mib not negative")


def _run(args: argparse.Namespace, server_pid: int | None) -> tuple[dict, str, bool]:
    """The chosen mode's summary, its table and whether its checks hold."""
    if args.sweep is None and args.hostile is None:
        summary = run_load(
            args.url,
            args.requests,
            args.concurrency,
            args.malformed,
            max_tokens=args.max_tokens,
            stream=args.stream,
            seed=args.seed,
            timeout=args.timeout,
            warmup=not args.no_warmup,
        )
        return summary, "", True
    host, port = loopback(args.url)
    if args.sweep is not None:
        summary = modes.run_sweep(
            host,
            port,
            args.sweep,
            max_tokens=args.max_tokens,
            requests=args.requests,
            seconds=args.seconds,
            timeout=args.timeout,
            stream=bool(args.stream),
        )
        ok = all(row["errors"] == 0 and row["differ_from_solo"] == 0 for row in summary["levels"])
        return summary, "sweep", ok
    summary = modes.run_mixed(
        host,
        port,
        args.requests,
        args.concurrency,
        args.hostile,
        max_tokens=args.max_tokens,
        stream=args.stream,
        seed=args.seed,
        timeout=args.timeout,
        server_pid=server_pid,
        rss_from=args.rss_from,
        max_rss_growth_mib=args.max_rss_growth_mib,
    )
    return summary, "mixed", all(v is not False for v in summary["checks"].values())


def main(argv: list[str] | None = None) -> int:
    """Run the load test the flags describe; returns the exit status (1: a check failed)."""
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    server, server_pid = None, args.server_pid
    if args.url is None:
        print("starting the server on the tiny fixture ...", file=sys.stderr, flush=True)
        server = TinyServer(
            args.checkpoint, max_new_tokens=max(8, args.max_tokens), slots=args.slots, decode_steps=args.decode_steps
        )
        args.url, server_pid = server.url, server.proc.pid
    try:
        print(f"load test of {args.url} ...", file=sys.stderr, flush=True)
        summary, kind, ok = _run(args, server_pid)
    finally:
        if server is not None:
            exit_status = server.stop()
    if server is not None:
        summary["server_tracebacks"], summary["server_exit"] = server.tracebacks, exit_status
    if kind == "sweep":
        table = modes.sweep_table(summary)
        if server is not None:
            table += f"\nserver tracebacks: {server.tracebacks}; exit status (SIGTERM): {exit_status}"
    elif kind == "mixed":
        table = modes.mixed_table(summary)
    else:
        table = report(summary)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
