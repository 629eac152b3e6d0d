"""Profiling a benchmark's compiled step: run it under `jax.profiler.trace` and summarise where the
device's time goes, per kernel class and per kernel, from the trace itself (no TensorBoard needed).

    python benchmarks/train_benchmark.py ... --profile prof/     # writes prof/ and prints the summary

The summary reads the `.xplane.pb` the profiler wrote: on a GPU, the kernels on the device plane's
stream lines (one event per kernel launch); on the CPU, the XLA thunks on the host's worker threads.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from collections.abc import Callable

CLASSES = (  # first match wins; names are CUDA kernel names or XLA op names
    ("matmul", re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|matmul|dot|ynn_fusion|wgmma|sm90_", re.I)),
    ("attention", re.compile(r"cudnn|fmha|flash|attention|splash", re.I)),
    (
        "copy / slice / update",
        re.compile(r"copy|memcpy|memset|dynamic[-_]update|dynamic[-_]slice|transpose|concat", re.I),
    ),
    ("reduce fusion", re.compile(r"reduce|reduction", re.I)),
    ("other fusion", re.compile(r"fusion|loop_|input_|triton", re.I)),
)


def kernel_class(name: str) -> str:
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other"


def _union_ns(intervals: list[tuple[int, int]]) -> int:
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _stat(event, key: str):
    try:
        for name, value in event.stats:
            if name == key:
                return value
    except Exception:  # noqa: BLE001 - stats are best effort
        return None
    return None


def device_events(path: str) -> tuple[str, list]:
    """`(where, events)`: the kernel events of the first GPU/TPU plane's stream lines, or the CPU's XLA
    thunk events when the trace has no device plane."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    for plane in data.planes:
        if plane.name.startswith("/device:") and "CUSTOM" not in plane.name:
            lines = [line for line in plane.lines if line.name.startswith("Stream")]
            if not lines:  # TPUs name their op lines differently
                lines = [line for line in plane.lines if "Ops" in line.name and "Module" not in line.name]
            events = [e for line in lines for e in line.events]
            if events:
                return plane.name, events
    for plane in data.planes:
        if plane.name == "/host:CPU":
            events = [
                e
                for line in plane.lines
                if line.name.startswith("tf_XLA")
                for e in line.events
                if e.duration_ns > 0 and not e.name.startswith(("ThreadpoolListener", "ThunkExecutor"))
            ]
            return plane.name, events
    return "none", []


def summarize(trace_dir: str, steps: int, top: int = 25) -> str:
    """A text report of the newest trace under `trace_dir`, per step (`steps` steps were traced)."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        return f"no trace under {trace_dir}"
    where, events = device_events(paths[-1])
    if not events:
        return f"no device events in {paths[-1]}"
    per_step = lambda ns: ns / 1e6 / steps  # noqa: E731
    span = max(e.end_ns for e in events) - min(e.start_ns for e in events)
    busy = _union_ns([(int(e.start_ns), int(e.end_ns)) for e in events])
    total = sum(e.duration_ns for e in events)
    out = [
        f"trace {paths[-1]} ({where}), {steps} step(s): {len(events) / steps:.0f} kernels/step, "
        f"kernel time {per_step(total):.2f} ms/step, device busy {per_step(busy):.2f} ms/step "
        f"of a {per_step(span):.2f} ms/step window ({100 * busy / max(span, 1):.0f}%)",
        "",
        "| class | ms/step | share | kernels/step |",
        "|---|---:|---:|---:|",
    ]
    by_class: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    by_name: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, ""])
    for e in events:
        name = str(e.name)
        cls = kernel_class(name + " " + str(_stat(e, "hlo_op") or ""))
        by_class[cls][0] += e.duration_ns
        by_class[cls][1] += 1
        entry = by_name[name]
        entry[0] += e.duration_ns
        entry[1] += 1
        entry[2] = entry[2] or str(_stat(e, "hlo_op") or "")
    for cls, (ns, n) in sorted(by_class.items(), key=lambda kv: -kv[1][0]):
        out.append(f"| {cls} | {per_step(ns):.3f} | {100 * ns / total:.1f}% | {n / steps:.0f} |")
    out += [
        "",
        f"top {top} kernels by time:",
        "",
        "| kernel | ms/step | calls/step | mean us | an HLO op |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (ns, n, op) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        out.append(f"| {name[:90]} | {per_step(ns):.3f} | {n / steps:.0f} | {ns / n / 1e3:.1f} | {op[:40]} |")
    return "\n".join(out)


def profile(run_step: Callable[[], None], trace_dir: str, steps: int = 3) -> str:
    """Trace `steps` calls of `run_step` (which must block until its step is done) into `trace_dir` and
    return the summary (also written to `trace_dir/summary.txt`)."""
    import jax

    os.makedirs(trace_dir, exist_ok=True)
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            run_step()
    report = summarize(trace_dir, steps)
    with open(os.path.join(trace_dir, "summary.txt"), "w") as f:
        f.write(report + "\n")
    return report
