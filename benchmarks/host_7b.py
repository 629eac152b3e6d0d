#!/usr/bin/env python
"""The full 7B model on one 24 GiB host: import, load + forward, generate, and a float32 reference.

    python benchmarks/host_7b.py [--workdir bench_out/host_7b] [--json PATH] [--shard-gb 2] [--keep]

Each phase runs in a fresh process; its wall time and peak resident memory (the child's own `ru_maxrss`,
from `os.wait4`) are reported:
1. write: a random bf16 checkpoint in the released 7B key layout (`configs/mplug_owl_llama_7b.py`:
   ViT-L/14, 6-layer abstractor with 64 queries, LLaMA-7B; 7,123,068,928 parameters) as
   `pytorch_model-0000k-of-0000n.bin` shards + `pytorch_model.bin.index.json` + `config.json`, written
   one shard at a time (`convert_benchmark.make_checkpoint`). The weights are drawn at the scales of a
   fresh owl_jax model (`convert_benchmark.source_tensors`): with N(0, 0.02²) everywhere instead, each
   random layer amplifies rounding differences, and bf16 drifts far from float32 in any implementation;
2. import: `python convert_weights.py import SRC OUT` (the source's bf16 kept);
3. forward: `owl_jax.from_pretrained(OUT, dtype="bfloat16")` and one forward pass on one image and a
   96-token text prompt (BOS, 40 tokens, the image's 65 placeholder ids -1, 55 tokens: 161 positions);
   the last position's logits are kept;
4. generate: the same load, then 16 greedy tokens with `owl_jax.inference.generate.Generator` from the
   same prompt (EOS masked, so all 16 are generated);
5. reference: the float32 reference of the same checkpoint. Float32 parameters (28.5 GB) do not fit in
   24 GiB, so the model is loaded with `param_dtype="bfloat16", dtype="float32"`: the weights stay the
   bf16 values stored in the checkpoint (upcasting them changes no value) and every computation runs in
   float32, i.e. exactly the float32 forward of this checkpoint. It runs the same forward pass.

The bf16 forward's last-position logits are compared with the reference's: top-1 must agree and the
relative error ||a - b|| / ||b|| must be at most 2%. The first generated token must be the bf16
forward's top-1. No tokenizer is needed (ids are drawn directly); nothing is downloaded.

Prints one markdown table (phase, time, peak RSS) and the comparison, writes the numbers as JSON
(`--json`, default `WORKDIR/host_7b.json`), and deletes the checkpoints unless `--keep`.
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

GiB = 1024**3
TEXT_BEFORE, TEXT_AFTER = 40, 55  # + BOS = 96 text tokens around the image
NEW_TOKENS = 16
MAX_REL_ERR = 0.02
RSS_TARGET_GIB = 16.0
PHASES = ("write", "import", "forward", "generate", "reference")


def prompt(cfg) -> dict:
    """One image and 96 text tokens: `pixel_values (1, 3, 224, 224)`, `input_ids`/`attention_mask (1, 161)`."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = lambda n: rng.integers(3, cfg.text.vocab_size, n)  # past BOS/EOS/pad
    ids = np.concatenate(
        [[cfg.text.bos_token_id], words(TEXT_BEFORE), np.full(cfg.image_tokens, -1), words(TEXT_AFTER)]
    ).astype(np.int32)[None]
    v = cfg.vision
    pixels = rng.standard_normal((1, v.num_channels, v.image_size, v.image_size), dtype=np.float32)
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": np.ones_like(ids)}


def child(phase: str, folder: str, result: str, shard_gb: float) -> None:
    """One phase, in its own process; writes its outputs to `result` (json / npz)."""
    import numpy as np

    start = time.perf_counter()
    if phase == "write":
        from benchmarks.convert_benchmark import make_checkpoint

        total = make_checkpoint(folder, max_shard_bytes=int(shard_gb * 1e9))
        with open(result, "w") as f:
            json.dump({"bytes": total, "seconds": time.perf_counter() - start}, f)
        return

    import jax

    import owl_jax

    dtype, param_dtype = ("float32", "bfloat16") if phase == "reference" else ("bfloat16", "bfloat16")
    model, _ = owl_jax.from_pretrained(folder, dtype=dtype, param_dtype=param_dtype, show_progress=False)
    jax.block_until_ready(jax.tree.leaves(model))
    loaded = time.perf_counter()
    inputs = prompt(model.config)
    if phase == "generate":
        from owl_jax.inference.generate import GenerationConfig, Generator

        out = Generator(model).generate(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["pixel_values"],
            GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS),
        )
        with open(result, "w") as f:
            json.dump(
                {"tokens": out.tokens[0], "load_seconds": loaded - start, "run_seconds": time.perf_counter() - loaded},
                f,
            )
        return
    logits = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    last = np.asarray(jax.device_get(logits[0, -1]), np.float32)
    np.savez(result, last=last, load_seconds=loaded - start, run_seconds=time.perf_counter() - loaded)


def run_phase(argv: list[str], log: str) -> dict:
    """Run `argv` as a child process; its wall time and its own peak RSS."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(argv)} failed with exit code {proc.returncode}:\n{tail}")
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss * 1024 / GiB}


def compare(bf16, reference) -> dict:
    import numpy as np

    a, b = np.asarray(bf16, np.float64), np.asarray(reference, np.float64)
    return {
        "top1_bf16": int(a.argmax()),
        "top1_float32": int(b.argmax()),
        "top1_equal": bool(a.argmax() == b.argmax()),
        "rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "max_abs_err": float(np.abs(a - b).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(REPO, "bench_out", "host_7b"))
    parser.add_argument("--json", default=None, help="results file (default WORKDIR/host_7b.json)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest source shard, in GB")
    parser.add_argument("--keep", action="store_true", help="keep the source and converted checkpoints")
    parser.add_argument("--child", nargs=3, metavar=("PHASE", "FOLDER", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, shard_gb=args.shard_gb)
        return 0

    work = os.path.abspath(args.workdir)
    src, out = os.path.join(work, "hf-7b"), os.path.join(work, "owl-7b")
    for folder in (src, out):
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    me = [sys.executable, os.path.abspath(__file__), "--shard-gb", str(args.shard_gb), "--child"]
    commands = {
        "write": me + ["write", src, os.path.join(work, "write.json")],
        "import": [sys.executable, os.path.join(REPO, "convert_weights.py"), "import", src, out, "--quiet"],
        "forward": me + ["forward", out, os.path.join(work, "forward.npz")],
        "generate": me + ["generate", out, os.path.join(work, "generate.json")],
        "reference": me + ["reference", out, os.path.join(work, "reference.npz")],
    }
    rows = {}
    try:
        for phase in PHASES:
            rows[phase] = run_phase(commands[phase], os.path.join(work, f"{phase}.log"))
            print(
                f"  {phase}: {rows[phase]['seconds']:.0f}s, peak RSS {rows[phase]['peak_rss_gib']:.2f} GiB", flush=True
            )
        import numpy as np

        with np.load(os.path.join(work, "forward.npz")) as fwd, np.load(os.path.join(work, "reference.npz")) as ref:
            agreement = compare(fwd["last"], ref["last"])
            for phase, data in (("forward", fwd), ("reference", ref)):
                rows[phase].update(load_seconds=float(data["load_seconds"]), run_seconds=float(data["run_seconds"]))
        with open(os.path.join(work, "generate.json")) as f:
            generated = json.load(f)
        rows["generate"].update(load_seconds=generated["load_seconds"], run_seconds=generated["run_seconds"])
        with open(os.path.join(work, "write.json")) as f:
            source_bytes = json.load(f)["bytes"]
    finally:
        if not args.keep:
            for folder in (src, out):
                shutil.rmtree(folder, ignore_errors=True)

    agreement["first_token_is_top1"] = generated["tokens"][0] == agreement["top1_bf16"]
    agreement["passed"] = agreement["top1_equal"] and agreement["rel_err"] <= MAX_REL_ERR
    labels = {
        "write": "write random 7B checkpoint (.bin shards)",
        "import": "`convert_weights.py import` (bf16)",
        "forward": "`from_pretrained` bf16 + forward",
        "generate": f"`from_pretrained` bf16 + {NEW_TOKENS} greedy tokens",
        "reference": "`from_pretrained` bf16 weights, float32 compute + forward",
    }
    print(f"\nsource {source_bytes / 1e9:.2f} GB; prompt: 1 image + 96 text tokens ({96 + 65} positions)\n")
    print("| phase | time (s) | peak RSS (GiB) |")
    print("|---|---:|---:|")
    for phase in PHASES:
        print(f"| {labels[phase]} | {rows[phase]['seconds']:.1f} | {rows[phase]['peak_rss_gib']:.2f} |")
    print(
        f"\nlast-position logits, bf16 vs float32 reference: top-1 {agreement['top1_bf16']} vs "
        f"{agreement['top1_float32']} ({'equal' if agreement['top1_equal'] else 'DIFFERENT'}), relative error "
        f"{agreement['rel_err']:.2%} (max {MAX_REL_ERR:.0%}), max abs error {agreement['max_abs_err']:.3g}; "
        f"first generated token {'=' if agreement['first_token_is_top1'] else '!='} bf16 top-1; "
        f"generated {generated['tokens']}"
    )
    over = [p for p in ("import", "forward", "generate") if rows[p]["peak_rss_gib"] > RSS_TARGET_GIB]
    if over:
        print(f"over the {RSS_TARGET_GIB:.0f} GiB target: {', '.join(over)}")
    path = args.json or os.path.join(work, "host_7b.json")
    with open(path, "w") as f:
        json.dump(
            {
                "source_bytes": source_bytes,
                "phases": rows,
                "logits": agreement,
                "tokens": generated["tokens"],
                "rss_target_gib": RSS_TARGET_GIB,
            },
            f,
            indent=2,
        )
    print(f"wrote {path}")
    return 0 if agreement["passed"] and not over else 1


if __name__ == "__main__":
    sys.exit(main())
