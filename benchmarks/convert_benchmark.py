#!/usr/bin/env python
"""Conversion benchmark on a synthetic checkpoint in the released 7B key layout.

Writes a random bfloat16 checkpoint with the full ViT-L/14, the full abstractor and `--llama-layers` LLaMA-7B
layers (embeddings and head included) as two `.bin` shards + index (the layout of the released `-ft`
model), then times each conversion in a fresh process and reports its peak resident memory:

    python benchmarks/convert_benchmark.py [--llama-layers 5] [--work-dir bench_out/convert]

Prints a table and writes `results.json` in the work dir. Every export is checked bit for bit
against the source.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GiB = 1024**3


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def source_tensors(cfg, seed: int = 0) -> list[tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]]:
    """Every tensor of the released layout for `cfg` as `(key, shape, "bfloat16", producer)`, in checkpoint order.

    Each producer draws its tensor when called, with the scales a fresh owl_jax model is initialised with,
    so that activations keep their size through the layers as in a trained model: linear and patch
    weights N(0, 1/fan_in), token embeddings and the class token N(0, 1), norm weights 1 + N(0, 0.02²),
    biases and the other embeddings N(0, 0.02²); the `rotary_emb.inv_freq` buffers are computed as the
    released code computes them. Tensor i uses seed `(seed, i)`, so the values do not depend on the order
    the tensors are drawn in.
    """
    import ml_dtypes

    from owl_jax.checkpoint import abstract_model, leaf_shapes, owl_targets, rotary_buffers

    bf16 = np.dtype(ml_dtypes.bfloat16)

    def scales(target) -> tuple[float, float]:  # (std, mean)
        leaf = target.path[-1]
        if leaf in ("kernel", "patch_embed"):
            return float(np.prod(target.hf_shape[1:])) ** -0.5, 0.0
        if leaf in ("embed_tokens", "cls_token"):
            return 1.0, 0.0
        return 0.02, 1.0 if leaf == "scale" else 0.0

    def draw(i: int, shape: tuple[int, ...], std: float, mean: float) -> Callable[[], np.ndarray]:
        def produce() -> np.ndarray:
            values = np.random.default_rng((seed, i)).standard_normal(shape, dtype=np.float32)
            values *= np.float32(std)
            values += np.float32(mean)
            return values.astype(bf16)

        return produce

    targets = owl_targets(cfg, leaf_shapes(abstract_model(cfg)[1]))
    tensors = [
        (t.hf_key, tuple(t.hf_shape), "bfloat16", draw(i, tuple(t.hf_shape), *scales(t))) for i, t in enumerate(targets)
    ]
    for key, inv in rotary_buffers(cfg.text):
        tensors.append((key, inv.shape, "bfloat16", lambda inv=inv: inv.astype(bf16)))
    return tensors


def make_checkpoint(
    out_dir: str, llama_layers: int | None = None, seed: int = 0, *, max_shard_bytes: int | None = None
) -> int:
    """The synthetic source: random bf16 weights in the released 7B key layout, `.bin` shards + index.

    Args:
      llama_layers: LLaMA-7B layers to keep (None: all 32, the full 7B model).
      max_shard_bytes: largest shard (default: half the checkpoint, i.e. two shards like the released `-ft`).

    Returns:
      The checkpoint's size in bytes. Shards are written one at a time (`torch.save` of one shard's tensors),
      so writing holds at most one shard in memory.
    """
    from configs.mplug_owl_llama_7b import get_config
    from owl_jax.checkpoint import write_hf_tensors

    cfg = get_config()
    if llama_layers is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=llama_layers))
    tensors = source_tensors(cfg, seed)
    total = sum(int(np.prod(shape, dtype=np.int64)) * 2 for _, shape, _, _ in tensors)
    os.makedirs(out_dir, exist_ok=True)
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = "bfloat16"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    write_hf_tensors(
        out_dir, tensors, fmt="bin", max_shard_bytes=max_shard_bytes or -(-total // 2), show_progress=False
    )
    return total


def child(op: str, src: str, dst: str) -> None:
    """One measured operation, in its own process so that its peak RSS is its own."""
    import owl_jax
    from owl_jax.checkpoint import export_checkpoint, import_checkpoint

    start = time.perf_counter()
    if op == "import":
        import_checkpoint(src, dst, show_progress=False)
    elif op == "export-safetensors":
        export_checkpoint(src, dst, fmt="safetensors", show_progress=False)
    elif op == "export-bin":
        export_checkpoint(src, dst, fmt="bin", show_progress=False)
    elif op == "load-to-device":
        model, _ = owl_jax.from_pretrained(src, dtype="bfloat16", show_progress=False)
        import jax

        jax.block_until_ready(model.language_model.layers.q_proj.kernel[...])
    else:
        raise ValueError(op)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it does not carry over, through exec,
    the memory of the parent that forked it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def idle_rss() -> int:
    code = (
        "import jax, owl_jax, torch, owl_jax.checkpoint, orbax.checkpoint; "
        "from benchmarks.convert_benchmark import peak_rss; print(peak_rss())"
    )
    return int(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.strip()
    )


def run(op: str, src: str, dst: str) -> dict:
    if dst and os.path.exists(dst):
        shutil.rmtree(dst)
    result = subprocess.run(
        [sys.executable, __file__, "--child", op, src, dst or "-"], capture_output=True, text=True, cwd=REPO
    )
    if result.returncode:
        raise RuntimeError(f"{op} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_exact(src: str, exported: str) -> int:
    from owl_jax.checkpoint import open_tensor_file, weight_files

    def load(folder):
        files, _ = weight_files(folder)
        for path in files:
            with open_tensor_file(path) as f:
                for key in f.keys():
                    yield key, f.get(key)

    source = {k: v.tobytes() for k, v in load(src)}
    n = 0
    for key, value in load(exported):
        if source.pop(key) != value.tobytes():
            raise AssertionError(f"{key} differs after the round trip")
        n += 1
    if source:
        raise AssertionError(f"keys missing from the export: {sorted(source)[:5]}")
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-layers", type=int, default=5)
    parser.add_argument("--work-dir", default=os.path.join(REPO, "bench_out", "convert"))
    parser.add_argument("--child", nargs=3, metavar=("OP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    work = os.path.abspath(args.work_dir)
    src = os.path.join(work, "hf-source")
    if os.path.exists(work):
        shutil.rmtree(work)
    t = time.perf_counter()
    source_bytes = make_checkpoint(src, args.llama_layers)
    print(
        f"synthetic checkpoint: {source_bytes / GiB:.2f} GiB in {time.perf_counter() - t:.0f}s "
        f"(ViT-L + abstractor + {args.llama_layers} LLaMA-7B layers, bf16, 2 .bin shards)",
        flush=True,
    )
    conv, st, binary = (os.path.join(work, n) for n in ("converted", "export-safetensors", "export-bin"))
    base = idle_rss()
    steps = [
        ("import .bin → owl_jax (bf16)", "import", src, conv, lambda: folder_bytes(os.path.join(conv, "params"))),
        ("export → safetensors", "export-safetensors", conv, st, lambda: folder_bytes(st)),
        ("export → .bin", "export-bin", conv, binary, lambda: folder_bytes(binary)),
        (
            "import safetensors → owl_jax",
            "import",
            st,
            conv + "-2",
            lambda: folder_bytes(os.path.join(conv + "-2", "params")),
        ),
        ("load .bin → device arrays", "load-to-device", src, "", lambda: source_bytes),
    ]
    rows = []
    for label, op, a, b, out_bytes in steps:
        r = run(op, a, b)
        size = out_bytes()
        rows.append(
            {
                "step": label,
                "seconds": r["seconds"],
                "gb_per_s": source_bytes / r["seconds"] / 1e9,
                "peak_rss_gib": r["peak_rss"] / GiB,
                "output_gib": size / GiB,
                "rss_minus_output_gib": (r["peak_rss"] - size) / GiB,
            }
        )
        print(f"  {label}: {r['seconds']:.1f}s", flush=True)
    checked = compare_exact(src, st) + compare_exact(src, binary)

    header = "| step | time (s) | GB/s | peak RSS (GiB) | output (GiB) | RSS − output (GiB) |"
    print(
        f"\nsource {source_bytes / GiB:.2f} GiB; an idle `import jax, torch, owl_jax` process peaks at "
        f"{base / GiB:.2f} GiB; {checked} exported tensors verified bit for bit\n"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['step']} | {row['seconds']:.1f} | {row['gb_per_s']:.2f} | {row['peak_rss_gib']:.2f} | "
            f"{row['output_gib']:.2f} | {row['rss_minus_output_gib']:+.2f} |"
        )
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(
            {
                "source_gib": source_bytes / GiB,
                "idle_rss_gib": base / GiB,
                "rows": rows,
                "llama_layers": args.llama_layers,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
