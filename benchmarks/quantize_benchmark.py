#!/usr/bin/env python
"""Weight quantization (`owl_jax.quant`): bytes, accuracy and speed on the tiny fixture; memory on the 7B layout.

    python benchmarks/quantize_benchmark.py tiny [--tokens 64] [--json PATH]
    python benchmarks/quantize_benchmark.py 7b [--modes int8,int4,bfloat16] [--tokens 4] [--lora] [--json PATH]

`tiny` (tests/fixtures/mplug_owl_tiny, bf16 compute; its weights are random N(0, 0.08), which quantize worse
than trained ones), for bf16 and for `from_pretrained(..., quantize="int8" | "int4")`:
- the language model's linear layers: bytes held against their bf16 kernels, and every parameter's bytes;
- logits on the fixture's three prompts: relative L2 error against the bf16 model (real positions);
- greedy decoding of `--tokens` tokens per prompt (EOS masked): the matched prefix with the bf16 model's
  tokens, and teacher-forced agreement (the top-1 pick given the bf16 model's tokens so far);
- CPU decode speed: the three prompts as one batch, after a warm-up run of the same shapes;
- one stage-2 (LoRA, q/v projections, rank 8) run of 3 steps on the fixture's batch over bf16 base
  weights and over int8 ones (`Trainer`, `frozen_dtype="bfloat16"`): the losses of each step.

`7b`: for each mode, one fresh process builds the released 7B layout (`configs/mplug_owl_llama_7b.py`)
with random weights, quantized one layer slice at a time (`owl_jax.quant.random_model`: no float copy of
the model is made), runs one forward pass on one image and 32 text tokens, and generates `--tokens`
greedy tokens from the same prompt; it reports the phases' times and its own peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`). Modes run one at a time. A random model of one seed holds
the same float32 draws in every mode (its quantized kernels quantize them), so the modes compare.
`--lora` runs three stage-2 steps instead (adapters rank 8 on q/v, the layers recomputed in the backward
pass) on the same prompt with its last 16 positions as the answer, and reports the losses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GiB = 1024**3
FIXTURE = os.path.join(REPO, "tests", "fixtures", "mplug_owl_tiny")
MODES = ("bfloat16", "int8", "int4")
RSS_TARGET_GIB = 10.0


# ---------------------------------------------------------------------------------------------------
# tiny fixture


def _greedy(generator, ref, tokens: int) -> tuple[list[list[int]], float]:
    from owl_jax.inference.generate import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
    args = (ref["input_ids"], ref["attention_mask"], ref["pixel_values"], config)
    generator.generate(*args)  # compiles every program of these shapes
    start = time.perf_counter()
    out = generator.generate(*args)
    return out.tokens, time.perf_counter() - start


def _teacher_forced(model, ref, continuations: list[list[int]]) -> list[float]:
    """Per prompt: how often `model`'s top-1 (EOS masked) is the next token of `continuations`."""
    import numpy as np

    ids, mask = ref["input_ids"], ref["attention_mask"]
    lengths = [int(m.sum()) for m in mask]
    rows = [np.concatenate([ids[r, : lengths[r]], continuations[r]]) for r in range(len(lengths))]
    width = max(len(r) for r in rows)
    batch = np.stack([np.pad(r, (0, width - len(r)), constant_values=2) for r in rows])
    batch_mask = (np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
    logits = np.asarray(model(ref["pixel_values"], batch, batch_mask)).copy()
    logits[..., 2] = -np.inf
    agree = []
    for r, n in enumerate(lengths):
        picks = logits[r, n - 1 : n - 1 + len(continuations[r])].argmax(-1)
        agree.append(float((picks == np.asarray(continuations[r])).mean()))
    return agree


def _stage2_losses(quantize: str | None, ref, steps: int = 3) -> list[float]:
    import numpy as np

    from owl_jax.checkpoint import load_checkpoint
    from owl_jax.config import LoRAConfig
    from owl_jax.quant import parse_quantize
    from owl_jax.quant.leaves import quantize_leaves
    from owl_jax.sharding import make_mesh
    from owl_jax.training.run import adapt_params
    from owl_jax.training.trainer import Trainer

    loaded = load_checkpoint(os.path.join(FIXTURE, "checkpoint"), on_host=True, show_progress=False)
    cfg = loaded.config.replace(dtype="bfloat16", quant=parse_quantize(quantize))
    leaves = loaded.leaves if cfg.quant is None else quantize_leaves(dict(loaded.leaves), cfg)
    cfg = cfg.replace(lora=LoRAConfig(rank=8, alpha=32, dropout=0.0))
    trainer = Trainer(
        cfg,
        stage="stage2",
        mesh=make_mesh(1, 1, 1),
        optim=dict(lr=1e-3, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0),
        total_steps=steps,
        frozen_dtype="bfloat16",
        train_abstractor=False,
    )
    state = trainer.init_state(adapt_params(leaves, cfg, None, seed=0), seed=0)
    slots = np.zeros((3, 2, *ref["pixel_values"].shape[1:]), np.float32)  # rows 0 and 1 show 1 and 2 images
    slots[0, 0], slots[1, 0], slots[1, 1] = ref["pixel_values"][0], ref["pixel_values"][1], ref["pixel_values"][2]
    batch = {
        "input_ids": ref["input_ids"].astype(np.int32),
        "attention_mask": ref["attention_mask"].astype(np.int32),
        "loss_mask": (ref["non_padding_mask"] * ref["non_media_mask"] * ref["prompt_mask"]).astype(np.int32),
        "pixel_values": slots,
        "image_mask": np.array([[1, 0], [1, 1], [0, 0]], np.int32),
        "skipped": np.zeros(3, np.int32),
    }
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, trainer.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses


def tiny(args: argparse.Namespace) -> dict:
    import numpy as np

    import owl_jax
    from owl_jax.inference.generate import Generator
    from owl_jax.quant import linear_bytes, param_bytes

    with np.load(os.path.join(FIXTURE, "reference.npz")) as data:
        ref = {k: data[k] for k in data.files}
    real = ref["attention_mask"].astype(bool)
    rel_err = lambda a, b: float(np.linalg.norm((a - b)[real]) / np.linalg.norm(b[real]))  # noqa: E731
    rows, models, logits = {}, {}, {}
    for mode in ("float32", *MODES):  # float32 first: bf16 is compared with it, the quantized ones with bf16
        models[mode], _ = owl_jax.from_pretrained(
            os.path.join(FIXTURE, "checkpoint"),
            dtype="float32" if mode == "float32" else "bfloat16",
            quantize=mode if mode.startswith("int") else None,
            show_progress=False,
        )
        logits[mode] = np.asarray(models[mode](ref["pixel_values"], ref["input_ids"], ref["attention_mask"]), float)
        tokens, seconds = _greedy(Generator(models[mode]), ref, args.tokens)
        rows[mode] = {
            "linear": linear_bytes(models[mode]),
            "params": param_bytes(models[mode]),
            "tokens": tokens,
            "decode_tokens_per_s": len(tokens) * args.tokens / seconds,
        }
    rows["bfloat16"]["logits_rel_err_vs_float32"] = rel_err(logits["bfloat16"], logits["float32"])
    reference_tokens = rows["bfloat16"]["tokens"]
    for mode in ("float32", "int8", "int4"):
        rows[mode]["logits_rel_err"] = rel_err(logits[mode], logits["bfloat16"])
        rows[mode]["prefix"] = [_prefix(t, b) for t, b in zip(rows[mode]["tokens"], reference_tokens)]
        rows[mode]["teacher_forced"] = _teacher_forced(models[mode], ref, reference_tokens)
    lora = {mode: _stage2_losses(None if mode == "bfloat16" else mode, ref) for mode in ("bfloat16", "int8")}
    _print_tiny(rows, lora, args.tokens)
    return {"rows": rows, "stage2_losses": lora, "tokens": args.tokens}


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _print_tiny(rows: dict, lora: dict, tokens: int) -> None:
    print(
        "\n| weights | quantized layers: bytes (× bf16) | LLM linear incl. head (× bf16) | all params | logits rel. "
        f"err vs bf16 | greedy prefix (of {tokens}) | teacher-forced top-1 | decode tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("float32", *MODES):
        r, size = rows[mode], rows[mode]["linear"]
        quantized = "-"
        if size["quantized"]:
            quantized = f"{size['quantized']:,} ({size['quantized'] / size['quantized_bf16']:.3f})"
        err = "-" if mode == "bfloat16" else f"{r['logits_rel_err']:.2%}"
        prefix = "-" if mode == "bfloat16" else "/".join(str(p) for p in r["prefix"])
        forced = "-" if mode == "bfloat16" else "/".join(f"{a:.0%}" for a in r["teacher_forced"])
        print(
            f"| {mode} | {quantized} | {size['held']:,} ({size['held'] / size['bf16']:.3f}) | {r['params']['total']:,} "
            f"| {err} | {prefix} | {forced} | {r['decode_tokens_per_s']:.0f} |"
        )
    print(f"(bf16 logits vs float32: {rows['bfloat16']['logits_rel_err_vs_float32']:.2%} relative error)")
    for mode, losses in lora.items():
        print(f"stage-2 LoRA losses over {mode} base weights: {', '.join(f'{x:.4f}' for x in losses)}")


# ---------------------------------------------------------------------------------------------------
# 7B layout, one mode per process


def _prompt(cfg, rng) -> tuple:
    """BOS, 16 tokens, one image's placeholders, 16 tokens (98 positions) and the image, `(1, 3, 224, 224)`."""
    import numpy as np

    words = lambda n: rng.integers(3, cfg.text.vocab_size, n)  # noqa: E731
    ids = np.concatenate([[1], words(16), np.full(cfg.image_tokens, -1), words(16)]).astype(np.int32)[None]
    v = cfg.vision
    return ids, rng.standard_normal((1, v.num_channels, v.image_size, v.image_size), dtype=np.float32)


def big_child(mode: str, tokens: int, result: str, lora: bool) -> None:
    """One 7B run in this process: build, then forward + generate (or one stage-2 LoRA step with `lora`)."""
    import jax
    import numpy as np

    from configs.mplug_owl_llama_7b import get_config
    from owl_jax.config import LoRAConfig
    from owl_jax.quant import linear_bytes, param_bytes, parse_quantize
    from owl_jax.quant.random_init import random_model

    times = {}
    start = time.perf_counter()
    cfg = get_config().replace(
        dtype="bfloat16", param_dtype="bfloat16", quant=parse_quantize(None if mode == "bfloat16" else mode)
    )
    if lora:  # the released recipe's adapters; layers recomputed in the backward pass (remat "full")
        cfg = cfg.replace(lora=LoRAConfig(rank=8, alpha=32, dropout=0.0), remat_policy="full")
    model = random_model(cfg, seed=0)
    jax.block_until_ready(jax.tree.leaves(model))
    times["build_s"] = time.perf_counter() - start
    out = {"mode": mode, "linear": linear_bytes(model), "params": param_bytes(model)}
    out["rss_after_build_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    ids, pixels = _prompt(cfg, np.random.default_rng(0))
    start = time.perf_counter()
    if lora:
        out["losses"] = _lora_step(model, cfg, ids, pixels)
        times["step_s"] = time.perf_counter() - start
    else:
        from owl_jax.inference.generate import GenerationConfig, Generator

        out["finite"] = bool(np.isfinite(np.asarray(model(pixels, ids, np.ones_like(ids)), np.float32)).all())
        times["forward_s"] = time.perf_counter() - start
        start = time.perf_counter()
        config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens)
        out["tokens"] = Generator(model).generate(ids, None, pixels, config).tokens[0]
        times["generate_s"] = time.perf_counter() - start
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    with open(result, "w") as f:
        json.dump({**out, **times, "positions": int(ids.shape[1])}, f)


def _lora_step(model, cfg, ids, pixels) -> list[float]:
    """Three stage-2 steps (adapters only; base weights frozen as built) on the prompt, the last 16 positions
    as the answer: each step's loss, before its update (the first step runs at the warmup's rate 0)."""
    import jax
    import numpy as np
    from flax import nnx

    from owl_jax.checkpoint import nest
    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer

    flat = {tuple(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # the adapters train in float32 (Adam's state follows them); the base stays as built
    params = nest({p: v.astype(np.float32) if p[-1] in ("lora_a", "lora_b") else v for p, v in flat.items()})
    del flat
    trainer = Trainer(
        cfg,
        stage="stage2",
        mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]),
        optim=dict(lr=1e-3, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0),
        total_steps=3,
        train_abstractor=False,
        prepare_frozen=False,  # (a transposed copy of every frozen kernel: not what this measures)
    )
    state = trainer.init_state(params, seed=0)
    del params
    loss_mask = np.zeros((1, ids.shape[1] - 1), np.int32)
    loss_mask[:, -16:] = 1
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "loss_mask": loss_mask,
        "pixel_values": pixels[:, None],
        "image_mask": np.ones((1, 1), np.int32),
        "skipped": np.zeros(1, np.int32),
    }
    losses = []
    for _ in range(3):
        state, metrics = trainer.train_step(state, trainer.global_batch(batch))
        losses.append(float(metrics["loss"]))
    return losses


def big(args: argparse.Namespace) -> dict:
    results = {}
    for mode in args.modes.split(","):
        kind = "lora" if args.lora else "run"
        path = os.path.join(args.workdir, f"7b_{kind}_{mode}.json")
        os.makedirs(args.workdir, exist_ok=True)
        argv = [sys.executable, os.path.abspath(__file__), "child", mode, "--tokens", str(args.tokens), "--out", path]
        done = subprocess.run(argv + (["--lora"] if args.lora else []), cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            print(f"{mode}: failed with exit code {done.returncode}\n{done.stderr[-3000:]}", file=sys.stderr)
            results[mode] = {"failed": done.returncode}
            continue
        with open(path) as f:
            results[mode] = json.load(f)
        print(f"  {mode}: {json.dumps(results[mode])}", flush=True)
    if args.lora:
        print("\n| 7B weights, stage-2 LoRA | all params GB | build (s) | 3 steps (s) | losses | peak RSS (GiB) |")
        print("|---|---:|---:|---:|---|---:|")
    else:
        print(
            f"\n| 7B weights | LLM linear GB | all params GB | build (s) | forward (s) | {args.tokens} tokens (s) | "
            "peak RSS (GiB) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        if "failed" in r:
            print(f"| {mode} | failed (exit code {r['failed']}) |")
        elif args.lora:
            losses = ", ".join(f"{x:.4f}" for x in r["losses"])
            print(
                f"| {mode} | {r['params']['total'] / 1e9:.2f} | {r['build_s']:.0f} | {r['step_s']:.0f} | {losses} | "
                f"{r['peak_rss_gib']:.2f} |"
            )
        else:
            print(
                f"| {mode} | {r['linear']['held'] / 1e9:.2f} | {r['params']['total'] / 1e9:.2f} | {r['build_s']:.0f} "
                f"| {r['forward_s']:.0f} | {r['generate_s']:.0f} | {r['peak_rss_gib']:.2f} |"
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["tiny", "7b", "child"])
    parser.add_argument("mode", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help="greedy tokens (tiny: 64, 7b: 4)")
    parser.add_argument("--modes", default="int8,int4,bfloat16", help="7b: the modes to run, one at a time")
    parser.add_argument("--workdir", default=os.path.join(REPO, "bench_out", "quantize"))
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--lora", action="store_true", help="7b: stage-2 LoRA steps instead of forward + generate")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "child":
        big_child(args.mode, args.tokens, args.out, args.lora)
        return 0
    args.tokens = args.tokens or (64 if args.what == "tiny" else 4)
    results = tiny(args) if args.what == "tiny" else big(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
