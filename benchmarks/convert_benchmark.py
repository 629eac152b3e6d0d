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
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GiB = 1024 ** 3


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def make_checkpoint(out_dir: str, llama_layers: int, seed: int = 0) -> int:
    """The synthetic source: random bf16 weights in the released key layout, 2 shards + index."""
    import torch

    from configs.mplug_owl_llama_7b import get_config
    from owl_jax.checkpoint.hf_import import abstract_model
    from owl_jax.checkpoint.layout import leaf_shapes, owl_targets, rotary_buffers

    cfg = get_config()
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "num_layers": llama_layers}))
    targets = owl_targets(cfg, leaf_shapes(abstract_model(cfg)[1]))
    os.makedirs(out_dir, exist_ok=True)
    hf = cfg.to_hf_config()
    hf["torch_dtype"] = "bfloat16"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    gen = torch.Generator().manual_seed(seed)
    buffers = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in rotary_buffers(cfg)}
    keys = [(t.hf_key, t.hf_shape) for t in targets] + [(k, tuple(v.shape)) for k, v in buffers.items()]
    half = len(keys) // 2
    weight_map, total = {}, 0
    for shard, chunk in enumerate([keys[:half], keys[half:]]):
        name = f"pytorch_model-{shard + 1:05d}-of-00002.bin"
        state = {k: buffers[k] if k in buffers else
                 (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
                 for k, shape in chunk}
        torch.save(state, os.path.join(out_dir, name))
        total += sum(v.numel() * 2 for v in state.values())
        weight_map.update({k: name for k in state})
        del state
    with open(os.path.join(out_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def child(op: str, src: str, dst: str) -> None:
    """One measured operation, in its own process so that its peak RSS is its own."""
    import owl_jax
    from owl_jax.checkpoint.convert import export_checkpoint, import_checkpoint

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
    code = ("import jax, owl_jax, torch, owl_jax.checkpoint.convert, orbax.checkpoint; "
            "from benchmarks.convert_benchmark import peak_rss; print(peak_rss())")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout.strip())


def run(op: str, src: str, dst: str) -> dict:
    if dst and os.path.exists(dst):
        shutil.rmtree(dst)
    result = subprocess.run([sys.executable, __file__, "--child", op, src, dst or "-"], capture_output=True,
                            text=True, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"{op} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_exact(src: str, exported: str) -> int:
    from owl_jax.checkpoint.tensor_files import open_tensor_file, weight_files

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
    print(f"synthetic checkpoint: {source_bytes / GiB:.2f} GiB in {time.perf_counter() - t:.0f}s "
          f"(ViT-L + abstractor + {args.llama_layers} LLaMA-7B layers, bf16, 2 .bin shards)", flush=True)
    conv, st, binary = (os.path.join(work, n) for n in ("converted", "export-safetensors", "export-bin"))
    base = idle_rss()
    steps = [
        ("import .bin → owl_jax (bf16)", "import", src, conv, lambda: folder_bytes(os.path.join(conv, "params"))),
        ("export → safetensors", "export-safetensors", conv, st, lambda: folder_bytes(st)),
        ("export → .bin", "export-bin", conv, binary, lambda: folder_bytes(binary)),
        ("import safetensors → owl_jax", "import", st, conv + "-2", lambda: folder_bytes(os.path.join(conv + "-2", "params"))),
        ("load .bin → device arrays", "load-to-device", src, "", lambda: source_bytes),
    ]
    rows = []
    for label, op, a, b, out_bytes in steps:
        r = run(op, a, b)
        size = out_bytes()
        rows.append({"step": label, "seconds": r["seconds"], "gb_per_s": source_bytes / r["seconds"] / 1e9,
                     "peak_rss_gib": r["peak_rss"] / GiB, "output_gib": size / GiB,
                     "rss_minus_output_gib": (r["peak_rss"] - size) / GiB})
        print(f"  {label}: {r['seconds']:.1f}s", flush=True)
    checked = compare_exact(src, st) + compare_exact(src, binary)

    header = f"| step | time (s) | GB/s | peak RSS (GiB) | output (GiB) | RSS − output (GiB) |"
    print(f"\nsource {source_bytes / GiB:.2f} GiB; an idle `import jax, torch, owl_jax` process peaks at "
          f"{base / GiB:.2f} GiB; {checked} exported tensors verified bit for bit\n")
    print(header)
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['step']} | {row['seconds']:.1f} | {row['gb_per_s']:.2f} | {row['peak_rss_gib']:.2f} | "
              f"{row['output_gib']:.2f} | {row['rss_minus_output_gib']:+.2f} |")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"source_gib": source_bytes / GiB, "idle_rss_gib": base / GiB, "rows": rows,
                   "llama_layers": args.llama_layers}, f, indent=2)


if __name__ == "__main__":
    main()
