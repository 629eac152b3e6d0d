#!/usr/bin/env python
"""One CPU fast path measured against its absence, in one process.

    python benchmarks/cpu_ablation.py --feature prepare_frozen|half_as_bits|hoist_invariants|float32_elementwise
        [--steps stage1 stage2]
        [--precision bfloat16] [--unrolled] [--rounds 7] [--config small] [--json out.json]

For each train step it builds two `Trainer`s on the `cpu_compare.py` config and batch, one with the
feature off and one with it on, compiles both, then alternates their steps `--rounds` times and prints
the median of each. Alternating in one process is what makes the comparison fair on a machine whose
speed drifts by tens of percent within an hour; timings from separate processes are not.

Features (each a route of `owl_jax.config.Numerics` or a `Trainer` option; "off" is the other choice):
- `prepare_frozen`: frozen kernels held in the compute dtype with transposed copies, made once per
  state (`Trainer(prepare_frozen=...)`) instead of in every step.
- `half_as_bits`: half-precision arrays that a scan over layers stacks or slices (frozen prepared kernels,
  the residuals of matmuls, SwiGLU and attention) kept as uint16 bit patterns (`Numerics.half_as_bits`).
- `hoist_invariants`: "on" compiles with XLA's while-loop invariant code motion (`Numerics.hoist_invariants`,
  off by default on a CPU): the "on" column is the feature's absence here.
- `float32_elementwise`: the elementwise chains of rotary embeddings, SwiGLU and the ViT's activation
  computed on float32 copies and rounded once, instead of op by op in the compute dtype
  (`Numerics.float32_elementwise`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--feature",
        required=True,
        choices=["prepare_frozen", "half_as_bits", "hoist_invariants", "float32_elementwise"],
    )
    p.add_argument("--steps", nargs="+", default=["stage1", "stage2"], choices=["stage1", "stage2"])
    p.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--unrolled", action="store_true", help="layers in a Python loop instead of a scan")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--config", default="small", choices=["tiny", "small", "medium"])
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")

    import jax

    from benchmarks.cpu_compare import OPTIM, TOTAL_STEPS, build_config, make_batch
    from benchmarks.train_benchmark import random_params
    from owl_jax.sharding import make_mesh
    from owl_jax.training.trainer import Trainer

    if jax.default_backend() != "cpu":
        p.error(f"this measures CPU fast paths; the default backend is {jax.default_backend()}")
    cfg_args = argparse.Namespace(
        config=args.config, set=None, rows=None, seq_len=None, images_per_row=None, lora_rank=None, dropout=False
    )
    base, lora, shape = build_config(cfg_args)
    base = base.replace(dtype=args.precision, scan_layers=not args.unrolled)
    rows = []
    for step in args.steps:
        cfg = base.replace(lora=lora) if step == "stage2" else base
        runs = {}
        for enabled in (False, True):
            numerics = cfg.numerics
            if args.feature in ("half_as_bits", "hoist_invariants"):
                numerics = numerics.replace(**{args.feature: "on" if enabled else "off"})
            if args.feature == "float32_elementwise":
                numerics = numerics.replace(float32_elementwise=enabled)
            prepare = enabled if args.feature == "prepare_frozen" else None
            trainer = Trainer(
                cfg.replace(numerics=numerics),
                stage=step,
                mesh=make_mesh(1, -1, 1),
                optim=OPTIM,
                total_steps=TOTAL_STEPS,
                prepare_frozen=prepare,
            )
            holder = [trainer.init_state(random_params(trainer, 0), seed=0)]
            batch = trainer.global_batch(make_batch(cfg, **shape))

            def run(trainer=trainer, holder=holder, batch=batch):
                holder[0], metrics = trainer.train_step(holder[0], batch)
                jax.block_until_ready(metrics)

            for _ in range(2):  # compile, then one warm step
                run()
            runs[enabled] = run
        times = {False: [], True: []}
        for i in range(args.rounds):
            for enabled, run in runs.items():
                start = time.perf_counter()
                run()
                times[enabled].append(time.perf_counter() - start)
            print(f"{step}: round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        off, on = (statistics.median(times[k]) * 1e3 for k in (False, True))
        rows.append(
            dict(
                step=step,
                precision=args.precision,
                layers="unrolled" if args.unrolled else "scanned",
                feature=args.feature,
                off_ms=off,
                on_ms=on,
                change=on / off - 1.0,
                off_all_ms=[t * 1e3 for t in times[False]],
                on_all_ms=[t * 1e3 for t in times[True]],
            )
        )

    print(
        f"\n{args.feature}, {args.precision}, layers {'unrolled' if args.unrolled else 'scanned'}, config "
        f"{args.config}; medians of {args.rounds} alternated steps\n"
    )
    print("| step | off (ms) | on (ms) | change |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['off_ms']:.1f} | {r['on_ms']:.1f} | {100 * r['change']:+.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
