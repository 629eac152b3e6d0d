#!/usr/bin/env python
"""Generation throughput: prefill tokens/s, decode tokens/s per batch size, time to first token.

    python benchmarks/generate_benchmark.py [--checkpoint DIR | --random-size tiny|1b|7b] [--batch-sizes 1 8 32]
        [--prompt-len 128] [--new-tokens 64] [--images-per-row 1] [--dtype float32|bfloat16] [--out results.json]
        [--unstack-layers] [--decode-chunk 16]

Default model: the tiny reference fixture; `--random-size` draws a model of that layout (see
`train_benchmark.py`) with random weights on the device instead, in `--dtype` (parameters too). Each
configuration is compiled first, then timed over `--repeats` runs (medians). Decoding runs with EOS disabled
(min_new_tokens = new tokens), so every row produces every token.

The generation loop decodes in on-device chunks of up to `--decode-chunk` steps (1: one dispatch per
token). "device ms/step" is `Generator.decode` (one step that returns float32 logits and picks no tokens)
dispatched from the host back to back, outside the generation loop.

On a chip with a known memory bandwidth the table adds the decode roofline: a decode step must read every
LLaMA weight and the KV cache once, so tokens/s cannot exceed batch × bandwidth / (weight bytes + cache
bytes); the last column is the measured rate as a percentage of that bound.
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


def prompts(cfg, batch: int, length: int, images_per_row: int, seed: int = 0):
    """Right-padded prompts of exactly `length` tokens, each with `images_per_row` image runs."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.text.vocab_size, size=(batch, length)).astype(np.int32)
    ids[:, 0] = 1
    t = cfg.image_tokens
    for k in range(images_per_row):
        start = 2 + k * (t + 2)
        if start + t >= length:
            raise ValueError(f"prompt length {length} cannot hold {images_per_row} images of {t} tokens")
        ids[:, start : start + t] = -1
    v = cfg.vision
    pixels = rng.normal(size=(batch * images_per_row, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return ids, np.ones_like(ids), pixels


def measure(generator, ids, mask, pixels, new_tokens: int):
    from owl_jax.inference.generate import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    marks = {}

    def on_token(step, tokens, finished):
        if step == 0:
            marks["first"] = time.perf_counter()

    start = time.perf_counter()
    generator.generate(ids, mask, pixels, config, stream=on_token)
    end = time.perf_counter()
    return {"ttft_s": marks["first"] - start, "decode_s": end - marks["first"], "total_s": end - start}


def device_step_ms(generator, ids, steps: int = 32, trace_dir: str | None = None) -> float:
    """Mean time of one `Generator.decode` step run back to back on the device (no token selection, no
    host round trip). With `trace_dir`, 5 more steps are traced there and the profile's summary printed."""
    import jax
    import jax.numpy as jnp

    b, p = ids.shape
    cache_len = p + steps + 1
    with generator._ctx():
        _, cache, key_valid = generator.prefill(
            generator.graphdef,
            generator.state,
            jnp.asarray(np.maximum(ids, 0)),
            jnp.ones((b, p), jnp.int32),
            None,
            cache_len,
        )
        tokens = jnp.full((b,), 5, jnp.int32)

        def run(cache, key_valid, n):
            for i in range(n):
                logits, cache, key_valid = generator.decode(
                    generator.graphdef,
                    generator.state,
                    cache,
                    tokens,
                    jnp.full((b,), p + i, jnp.int32),
                    jnp.int32(p + i),
                    key_valid,
                )
            jax.block_until_ready(logits)
            return cache, key_valid

        cache, key_valid = run(cache, key_valid, 2)
        start = time.perf_counter()
        cache, key_valid = run(cache, key_valid, steps - 2)
        elapsed = time.perf_counter() - start
        if trace_dir:
            from benchmarks._profile import profile

            carry = [cache, key_valid]

            def one() -> None:
                carry[:] = run(*carry, 1)

            print(profile(one, trace_dir, steps=5), file=sys.stderr, flush=True)
    return elapsed / (steps - 2) * 1e3


# HBM bandwidth per chip, bytes/s, by `jax.Device.device_kind` substring.
HBM_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def bandwidth(kind: str):
    return next((v for k, v in HBM_BANDWIDTH.items() if k.lower() in kind.lower()), None)


def random_model(size: str, dtype: str, scan_layers: bool = True):
    """An `Owl` of the `size` layout with random weights drawn on the device in `dtype`."""
    from flax import nnx

    from benchmarks.train_benchmark import model_config, random_leaves
    from owl_jax.checkpoint import abstract_model, assemble

    cfg = model_config(size, dtype=dtype, param_dtype=dtype).replace(scan_layers=scan_layers)
    graphdef, abstract = abstract_model(cfg)
    specs = {
        tuple(str(k) for k in path): (var.get_value() if hasattr(var, "get_value") else var.value)
        for path, var in nnx.to_flat_state(abstract)
    }
    return assemble(graphdef, abstract, random_leaves(specs, seed=0))


def parse_options(items: list[str]) -> dict:
    """["key=value", ...] → {key: bool | int | float | str}."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--compiler-option wants KEY=VALUE, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            options[key] = low == "true"
        else:
            try:
                options[key] = int(value)
            except ValueError:
                try:
                    options[key] = float(value)
                except ValueError:
                    options[key] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "tests", "fixtures", "mplug_owl_tiny", "checkpoint"))
    parser.add_argument(
        "--random-size",
        choices=["tiny", "1b", "7b"],
        default=None,
        help="random weights of this layout instead of --checkpoint",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--images-per-row", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--unrolled", action="store_true", help="run the layers as an unrolled loop instead of one scanned layer"
    )
    parser.add_argument(
        "--unstack-layers",
        action="store_true",
        help="Generator(unstack_layers=True): the LLM's layers from one weight buffer each",
    )
    parser.add_argument(
        "--compiler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an XLA option for the generator's compiled steps (repeatable), e.g. xla_gpu_enable_triton_gemm=false",
    )
    parser.add_argument(
        "--decode-chunk",
        type=int,
        default=16,
        help="Generator(decode_chunk=N): the most decode steps per on-device loop (1: one dispatch per token)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="trace 5 back-to-back decode steps per batch size into DIR and print where the time goes",
    )
    args = parser.parse_args()

    import jax

    import owl_jax
    from owl_jax.inference.generate import Generator
    from owl_jax.training.flops import tower_matmul_params

    if args.random_size:
        model, name = random_model(args.random_size, args.dtype, not args.unrolled), f"random {args.random_size}"
    else:
        model, _ = owl_jax.from_pretrained(
            args.checkpoint, dtype=args.dtype, scan_layers=not args.unrolled, show_progress=False
        )
        name = os.path.basename(os.path.normpath(args.checkpoint))
    generator = Generator(
        model,
        unstack_layers=args.unstack_layers,
        decode_chunk=args.decode_chunk,
        compiler_options=parse_options(args.compiler_option),
    )
    t = model.config.text
    itemsize = jax.numpy.dtype(args.dtype).itemsize
    weight_bytes = tower_matmul_params(model.config)["llm"] * itemsize  # every LLaMA matmul weight, head included
    hbm = bandwidth(jax.devices()[0].device_kind)
    rows = []
    for batch in args.batch_sizes:
        ids, mask, pixels = prompts(model.config, batch, args.prompt_len, args.images_per_row)
        measure(generator, ids, mask, pixels, args.new_tokens)  # compile
        runs = [measure(generator, ids, mask, pixels, args.new_tokens) for _ in range(args.repeats)]
        ttft = statistics.median(r["ttft_s"] for r in runs)
        decode = statistics.median(r["decode_s"] for r in runs)
        device_ms = device_step_ms(
            generator, ids, trace_dir=args.profile and os.path.join(args.profile, f"decode_batch{batch}")
        )
        rows.append(
            {
                "batch": batch,
                "prompt_len": args.prompt_len,
                "images": batch * args.images_per_row,
                "device_decode_ms_per_step": device_ms,
                "ttft_ms": ttft * 1e3,
                "prefill_tok_s": batch * args.prompt_len / ttft,
                "decode_tok_s": batch * (args.new_tokens - 1) / decode,
                "decode_ms_per_step": decode / (args.new_tokens - 1) * 1e3,
            }
        )
        # KV cache read per step at the mean context length of the decode phase.
        context = args.prompt_len + args.new_tokens / 2
        cache_bytes = 2 * t.num_layers * batch * context * t.num_kv_heads * t.head_dim * itemsize
        bound = None if hbm is None else batch * hbm / (weight_bytes + cache_bytes)
        rows[-1]["roofline_tok_s"] = bound
        rows[-1]["roofline_pct"] = None if bound is None else 100 * rows[-1]["decode_tok_s"] / bound
        print(f"batch {batch}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    device = jax.devices()[0]
    layout = "unstacked" if args.unstack_layers else "unrolled" if args.unrolled else "scanned"
    layout += f" layers, decode chunks of up to {args.decode_chunk} steps"
    if args.compiler_option:
        layout += ", " + " ".join(args.compiler_option)
    print(
        f"\nmodel {name} ({args.dtype}, {layout}), {device.platform} "
        f"{device.device_kind} x{jax.device_count()}; prompt {args.prompt_len} tokens with "
        f"{args.images_per_row} image(s) per row, {args.new_tokens} new tokens, median of {args.repeats}\n"
    )
    print(
        "| batch | time to first token (ms) | prefill tokens/s | decode tokens/s | decode ms/step | "
        "device ms/step | HBM roofline tokens/s | % of roofline |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        roof = "n/a" if r["roofline_tok_s"] is None else f"{r['roofline_tok_s']:.0f}"
        pct = "n/a" if r["roofline_pct"] is None else f"{r['roofline_pct']:.1f}%"
        print(
            f"| {r['batch']} | {r['ttft_ms']:.1f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} | "
            f"{r['decode_ms_per_step']:.2f} | {r['device_decode_ms_per_step']:.2f} | {roof} | {pct} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device.device_kind, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
