#!/usr/bin/env python
"""Train-step throughput: stage 1 and stage 2 (LoRA) at a chosen size, with random weights.

    python benchmarks/train_benchmark.py [--size tiny|1b|7b] [--stages stage1 stage2] [--rows 16 8 4]
        [--seq-len 1024] [--images-per-row 1] [--dtype bfloat16|float32] [--frozen-dtype bfloat16]
        [--remat none|full|dots|dots_with_no_batch_dims] [--loss-chunk 256] [--attention auto|xla|jax|cudnn]
        [--steps 5] [--warmup 2] [--json out.json]

Weights are drawn on the device in the dtypes the stage holds them in (`--frozen-dtype` for frozen
towers), so the 7B layout needs no host copy. Each stage is compiled, run `--warmup` times, then timed
over `--steps` steps (median). Reported per stage: step time, tokens/s and images/s (whole step, all
devices), model FLOPs per step by `owl_jax.training.flops.train_step_flops` (causal attention counted
half), MFU against the chip's dense bf16 peak (`--peak-tflops` overrides; n/a on the CPU), and memory:
the device's peak bytes in use where it reports them (GPU, TPU), else the compiled step's footprint
(arguments + temporaries, from XLA's memory analysis).

With several `--rows`, each stage takes the first (largest) that fits: a compiled step whose footprint
exceeds the device's memory limit is skipped before it runs, and one that fails with out-of-memory at run
time makes way for the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

OPTIM = dict(lr=1e-4, end_lr=0.0, warmup_steps=10, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.1, clip_norm=1.0)


def model_config(size: str, *, dtype: str, param_dtype: str = "float32", remat: str = "none", attention: str = "auto"):
    """The `size` layout (tiny, 1b, 7b) with these run-time settings and dropout off."""
    import dataclasses

    from owl_jax.config import AbstractorConfig, Numerics, OwlConfig, TextConfig, VisionConfig

    if size == "7b":
        from configs.mplug_owl_llama_7b import get_config

        cfg = get_config()
    elif size == "1b":  # ViT-L/14 and the 7B abstractor in front of a 1.1B LLaMA (TinyLlama-like widths)
        from configs.mplug_owl_llama_7b import get_config

        cfg = get_config().replace(
            text=TextConfig(
                vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=32
            )
        )
    elif size == "tiny":
        cfg = OwlConfig(
            vision=VisionConfig(
                hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4, image_size=112, patch_size=14
            ),
            abstractor=AbstractorConfig(
                hidden_size=256, intermediate_size=704, num_layers=2, num_heads=4, encoder_hidden_size=256
            ),
            text=TextConfig(
                vocab_size=8000, hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=8
            ),
            num_query_tokens=32,
        )
    else:
        raise SystemExit(f"unknown --size {size!r}")
    # Dropout off: the benchmark measures the model's work, not random-mask generation.
    cfg = cfg.replace(
        abstractor=dataclasses.replace(cfg.abstractor, attention_dropout=0.0),
        dtype=dtype,
        param_dtype=param_dtype,
        remat_policy=remat,
        numerics=Numerics(attention=attention),
    )
    return cfg.validate()


def random_leaves(specs: dict, seed: int, shardings: dict | None = None) -> dict:
    """`{path: ShapeDtypeStruct}` → `{path: array}` drawn on the devices (norm scales 1, biases and LoRA B 0,
    other weights N(0, 0.02²)), in each leaf's dtype and, when given, sharding."""
    import jax
    import jax.numpy as jnp

    paths = sorted(specs)

    def draw(key):
        out = {}
        for i, path in enumerate(paths):
            shape, dtype = specs[path].shape, specs[path].dtype
            if path[-1] == "scale":
                out[path] = jnp.ones(shape, dtype)
            elif path[-1] in ("bias", "lora_b"):
                out[path] = jnp.zeros(shape, dtype)
            else:
                out[path] = (0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dtype)
        return out

    return jax.jit(draw, out_shardings=shardings)(jax.random.key(seed))


def random_params(trainer, seed: int):
    """Every leaf of the stage's state, drawn on its devices in its dtype and sharding."""
    from owl_jax.checkpoint import flatten, nest

    abstract = flatten(trainer.abstract_state().params)
    return nest(random_leaves(abstract, seed, {p: s.sharding for p, s in abstract.items()}))


def batch_for(cfg, rows: int, seq_len: int, images_per_row: int, seed: int = 0) -> dict:
    from benchmarks.generate_benchmark import prompts

    if 2 + images_per_row * (cfg.image_tokens + 2) >= seq_len // 2:
        raise SystemExit(
            f"--seq-len {seq_len} is too short for {images_per_row} images of {cfg.image_tokens} "
            "tokens in its first half (the second half is the answer)"
        )
    ids, mask, pixels = prompts(cfg, rows, seq_len, images_per_row, seed)
    loss_mask = np.zeros((rows, seq_len - 1), np.int32)
    loss_mask[:, seq_len // 2 :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "loss_mask": loss_mask,
        "pixel_values": pixels.reshape(rows, images_per_row, *pixels.shape[1:]),
        "image_mask": np.ones((rows, images_per_row), np.int32),
        "skipped": np.zeros(rows, np.int32),
    }


def device_peak_bytes():
    import jax

    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


class DoesNotFit(Exception):
    pass


def device_memory_limit():
    import jax

    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
    return min(limits) if limits and all(x is not None for x in limits) else None


def is_out_of_memory(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def run_stage(stage: str, cfg, lora, args, mesh) -> dict:
    """The stage at the first of `args.rows` that fits in memory."""
    import gc

    import jax

    stage_cfg = cfg.replace(lora=lora) if stage == "stage2" else cfg
    for rows in args.rows:
        try:
            return run_stage_rows(stage, stage_cfg, rows, args, mesh)
        except DoesNotFit as e:
            print(f"{stage}: {rows} rows do not fit ({e}); trying fewer", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - only out-of-memory errors move on
            if not is_out_of_memory(e):
                raise
            print(f"{stage}: {rows} rows ran out of memory; trying fewer", file=sys.stderr, flush=True)
        gc.collect()
        jax.clear_caches()
    raise SystemExit(f"{stage}: none of rows {args.rows} fits in memory")


def run_stage_rows(stage: str, stage_cfg, rows: int, args, mesh) -> dict:
    import jax

    from owl_jax.sharding import use_mesh
    from owl_jax.training.flops import peak_flops, train_step_flops
    from owl_jax.training.trainer import Trainer

    trainer = Trainer(
        stage_cfg,
        stage=stage,
        mesh=mesh,
        optim=OPTIM,
        total_steps=1000,
        frozen_dtype=args.frozen_dtype,
        loss_chunk=args.loss_chunk,
    )
    t0 = time.perf_counter()
    state = trainer.init_state(random_params(trainer, args.seed), seed=args.seed)
    init_s = time.perf_counter() - t0
    batch = trainer.global_batch(batch_for(stage_cfg, rows, args.seq_len, args.images_per_row))
    t0 = time.perf_counter()
    with use_mesh(trainer.mesh):  # the trainer's own step, compiled once here and timed below
        compiled = trainer.jitted_step(state, batch).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    footprint = None if analysis is None else analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
    limit = device_memory_limit()
    if footprint is not None and limit is not None and footprint > limit:
        raise DoesNotFit(f"compiled footprint {footprint / 2**30:.1f} GiB > limit {limit / 2**30:.1f} GiB")
    print(
        f"{stage}: {rows} rows, compiled in {compile_s:.0f} s, footprint "
        f"{'n/a' if footprint is None else f'{footprint / 2**30:.1f} GiB'}",
        file=sys.stderr,
        flush=True,
    )
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    if args.profile:
        from benchmarks._profile import profile

        def one() -> None:
            nonlocal state, metrics
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)

        print(profile(one, os.path.join(args.profile, stage)), file=sys.stderr, flush=True)
    images = rows * args.images_per_row
    flops = train_step_flops(stage_cfg, stage, rows=rows, seq_len=args.seq_len, images=images)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(kind)
    peak_total = None if peak is None else peak * jax.device_count()
    return {
        "stage": stage,
        "rows": rows,
        "step_s": step,
        "steps": times,
        "tokens_per_s": rows * args.seq_len / step,
        "images_per_s": images / step,
        "tflops_per_step": flops / 1e12,
        "tflops_per_s_per_chip": flops / step / 1e12 / jax.device_count(),
        "mfu": None if peak_total is None else flops / step / peak_total,
        "peak_bytes": device_peak_bytes(),
        "compiled_footprint_bytes": footprint,
        "loss": float(metrics["loss"]),
        "trainable": trainer.num_trainable,
        "frozen": trainer.num_frozen,
        "init_s": init_s,
        "compile_s": compile_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "1b", "7b"], default="tiny")
    p.add_argument("--stages", nargs="+", choices=["stage1", "stage2"], default=["stage1", "stage2"])
    p.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[4],
        help="sequences per step (global); several: the first that fits in memory",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--images-per-row", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype")
    p.add_argument("--frozen-dtype", default="bfloat16", help='dtype of frozen weights ("" keeps float32)')
    p.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_with_no_batch_dims"])
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument(
        "--unrolled",
        action="store_true",
        help="scan_layers=False: each tower's layers as an unrolled loop instead of one scanned layer",
    )
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "jax", "cudnn"])
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (one may be -1)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-chip peak for MFU (default: by chip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="after timing, trace 3 more steps into DIR/<stage> and print where the device time goes",
    )
    args = p.parse_args()

    import jax

    from owl_jax.config import LoRAConfig
    from owl_jax.sharding import make_mesh

    cfg = model_config(args.size, dtype=args.dtype, remat=args.remat, attention=args.attention)
    cfg = cfg.replace(scan_layers=not args.unrolled)
    lora = LoRAConfig(rank=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.0)
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = make_mesh(data, fsdp, tensor)
    device = jax.devices()[0]
    results = []
    for stage in args.stages:
        print(f"{stage}: compiling and timing ...", file=sys.stderr, flush=True)
        results.append(run_stage(stage, cfg, lora, args, mesh))
    print(
        f"\n{args.size} layout, {device.platform} {device.device_kind} x{jax.device_count()}, mesh "
        f"{dict(mesh.shape)}, compute {args.dtype}, frozen {args.frozen_dtype or 'float32'}, remat {args.remat}, "
        f"{'unrolled' if args.unrolled else 'scanned'} layers, "
        f"attention {args.attention}, {args.seq_len} tokens per row, {args.images_per_row} image(s)/row, "
        f"median of {args.steps}\n"
    )
    print("| stage | rows | step (ms) | tokens/s | images/s | TFLOP/step | TFLOP/s/chip | MFU | peak memory (GiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        mem = r["peak_bytes"] if r["peak_bytes"] is not None else r["compiled_footprint_bytes"]
        mem_s = "n/a" if mem is None else f"{mem / 2**30:.2f}" + ("" if r["peak_bytes"] is not None else " (compiled)")
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(
            f"| {r['stage']} | {r['rows']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['images_per_s']:.1f} | "
            f"{r['tflops_per_step']:.3f} | {r['tflops_per_s_per_chip']:.2f} | {mfu} | {mem_s} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": device.device_kind,
                    "platform": device.platform,
                    "devices": jax.device_count(),
                    "args": vars(args),
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
