#!/usr/bin/env python
"""The server's memory under large images: peak and resident RSS above idle for concurrent big PNGs.

    python benchmarks/serve_image_memory.py [--side 9400] [--concurrent 3] [--rounds 2]

Starts `owl-serve` on the tiny reference fixture (as `serve_load.py` does), sends one small request to
warm it up, reads its idle RSS, then sends `--concurrent` chat requests at once, each carrying a
`--side`×`--side` one-colour PNG (a few hundred kB on the wire, 4 bytes a pixel once decoded), for
`--rounds` rounds. It prints the server's peak RSS above idle (VmHWM) and its resident RSS above idle
after each round (VmRSS), read from /proc (Linux only).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import sys
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from benchmarks.serve_load import TinyServer  # noqa: E402
from helpers import solid_png  # noqa: E402


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of process `pid`, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def chat(url: str, image_url: str | None) -> int:
    """One greedy, one-token chat completion; returns the HTTP status."""
    content = [{"type": "text", "text": "What colour is it?"}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0}
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=9400, help="side of the square PNG (default 9400)")
    p.add_argument("--concurrent", type=int, default=3, help="requests sent at once (default 3)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.side < 1 or args.concurrent < 1 or args.rounds < 1:
        p.error("--side, --concurrent and --rounds must be positive")
    big = "data:image/png;base64," + base64.b64encode(solid_png(args.side, args.side)).decode()
    small = "data:image/png;base64," + base64.b64encode(solid_png(32, 32)).decode()
    server = TinyServer(None, max_new_tokens=8)
    try:
        assert chat(server.url, small) == 200  # compile the model's steps before measuring
        idle = memory_mib(server.proc.pid)
        print(f"{args.concurrent} concurrent {args.side}x{args.side} PNGs ({len(big) >> 10} KiB each as data URLs)")
        print(f"idle RSS {idle['VmRSS']:.0f} MiB (peak so far {idle['VmHWM']:.0f} MiB)")
        print("| round | statuses | peak RSS above idle (MiB) | resident after, above idle (MiB) |")
        print("|---|---|---|---|")
        with concurrent.futures.ThreadPoolExecutor(args.concurrent) as pool:
            for round_ in range(1, args.rounds + 1):
                statuses = list(pool.map(lambda _: chat(server.url, big), range(args.concurrent)))
                now = memory_mib(server.proc.pid)
                print(
                    f"| {round_} | {' '.join(map(str, statuses))} | {now['VmHWM'] - idle['VmRSS']:.0f} "
                    f"| {now['VmRSS'] - idle['VmRSS']:.0f} |",
                    flush=True,
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
