#!/usr/bin/env python
"""owl_jax against PyTorch on CPU: forward pass, stage-1 step and stage-2 LoRA step, float32 and bf16.

    python benchmarks/cpu_compare.py [--config tiny|small|medium] [--repeats 5] [--json out.json]
        [--rows N] [--seq-len L] [--images-per-row M] [--lora-rank R] [--set text.num_layers=8 ...]
        [--steps forward stage1 stage2] [--precisions float32 bfloat16] [--torch-attn sdpa eager]
        [--dropout] [--warmup 2] [--torch-repeats N] [--torch-warmup N] [--torch-threads N] [--unrolled]
        [--huge-pages] [--interleave]

Both frameworks run in this one process on the same model config and the same batch (random weights,
random pixels, `rows` sequences of `seq_len` tokens with `images-per-row` images each, loss over the
second half of every row):

- owl_jax: the project's own code. Forward = `Trainer.logits` (ViT → abstractor → LLaMA with the image
  embeddings spliced in, float32 logits) under `jax.jit`; train steps = `Trainer(stage=...).train_step`
  (clipped AdamW, LLM frozen in stage 1 with gradients flowing through it; stage 2 trains LoRA on
  q_proj/v_proj and the abstractor, the ViT runs forward only). bf16 = the model's compute dtype
  bfloat16 with float32 parameters.
- PyTorch: HF `CLIPVisionModel` + an abstractor of the same shapes + HF `LlamaForCausalLM` (peft LoRA on
  q_proj/v_proj for stage 2), AdamW(foreach) with global-norm clipping. bf16 = `torch.autocast("cpu",
  bfloat16)` over float32 parameters. Each step is timed with every `--torch-attn` implementation and
  the fastest is reported.

Times are medians of `--repeats` after `--warmup` untimed runs (the first JAX run compiles);
`--torch-repeats` / `--torch-warmup` set PyTorch's separately (on a CPU without AVX-512 bf16, PyTorch's
autocast steps run on slow bf16 fallbacks and take minutes each). By default each framework's runs are
timed in one stretch; `--interleave` alternates them (one owl_jax run, one per PyTorch variant, and
again), so that a slow spell of a shared machine slows both instead of one; each framework's memory
churn then also falls on the other's runs, which costs where page faults are dear (docs/performance.md).
FLOPs are `owl_jax.training.flops.train_step_flops` (forward: the same count with every multiplier 1). The matmul
floor is FLOPs divided by the best GEMM rate this script measures with jitted JAX at that precision on
config-shaped matmuls (bf16 inputs with float32 accumulation); PyTorch's GEMM rates are reported beside
it. Dropout is off on both sides unless `--dropout` (abstractor attention 0.1, LoRA 0.05).
`--huge-pages` runs the whole comparison (both frameworks) with glibc's malloc on transparent huge pages,
as `owl-train --huge_pages` does (`owl_jax/cli/host_memory.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vision=dict(hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4, image_size=56, patch_size=14),
        abstractor=dict(hidden_size=128, intermediate_size=352, num_layers=1, num_heads=4),
        text=dict(vocab_size=1000, hidden_size=192, intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=4),
        num_query_tokens=8,
        rows=2,
        seq_len=64,
        images_per_row=1,
        lora_rank=8,
    ),
    "small": dict(
        vision=dict(hidden_size=512, intermediate_size=2048, num_layers=6, num_heads=8, image_size=112, patch_size=14),
        abstractor=dict(hidden_size=512, intermediate_size=1408, num_layers=2, num_heads=8),
        text=dict(
            vocab_size=8000, hidden_size=768, intermediate_size=2048, num_layers=6, num_heads=12, num_kv_heads=12
        ),
        num_query_tokens=32,
        rows=4,
        seq_len=256,
        images_per_row=1,
        lora_rank=8,
    ),
    "medium": dict(
        vision=dict(
            hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, image_size=224, patch_size=14
        ),
        abstractor=dict(hidden_size=768, intermediate_size=2048, num_layers=4, num_heads=12),
        text=dict(
            vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16, num_kv_heads=16
        ),
        num_query_tokens=64,
        rows=4,
        seq_len=512,
        images_per_row=1,
        lora_rank=8,
    ),
}

OPTIM = dict(lr=1e-4, end_lr=0.0, warmup_steps=10, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.05, clip_norm=1.0)
TOTAL_STEPS = 1000
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16"}
STEP_NAMES = {
    "forward": "forward (logits)",
    "stage1": "stage-1 step (ViT + abstractor)",
    "stage2": "stage-2 LoRA step (LoRA + abstractor)",
}


# ------------------------------------------------------------------------------------------------
# config, batch, FLOPs
def build_config(args):
    from owl_jax.config import AbstractorConfig, LoRAConfig, OwlConfig, TextConfig, VisionConfig

    p = json.loads(json.dumps(PRESETS[args.config]))
    for item in args.set or []:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if not field:
            if section not in p:
                raise SystemExit(f"--set {item}: unknown key {section!r}")
            p[section] = type(p[section])(value)
        else:
            if section not in ("vision", "abstractor", "text"):
                raise SystemExit(f"--set {item}: section must be vision, abstractor or text")
            p[section][field] = int(value) if value.lstrip("-").isdigit() else float(value)
    p["abstractor"]["encoder_hidden_size"] = p["vision"]["hidden_size"]  # the abstractor reads ViT tokens
    for name in ("rows", "seq_len", "images_per_row", "lora_rank"):
        if getattr(args, name) is not None:
            p[name] = getattr(args, name)
    drop = args.dropout
    cfg = OwlConfig(
        vision=VisionConfig(**p["vision"]),
        abstractor=AbstractorConfig(**p["abstractor"], attention_dropout=0.1 if drop else 0.0),
        text=TextConfig(**p["text"]),
        num_query_tokens=p["num_query_tokens"],
    ).validate()
    lora = LoRAConfig(
        rank=p["lora_rank"],
        alpha=32.0,
        dropout=0.05 if drop else 0.0,
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
    )
    shape = dict(rows=p["rows"], seq_len=p["seq_len"], images_per_row=p["images_per_row"])
    return cfg, lora, shape


def make_batch(cfg, rows: int, seq_len: int, images_per_row: int, seed: int = 0) -> dict[str, np.ndarray]:
    """BOS, then each image's Q + 1 placeholders followed by two text tokens; answers = the second half."""
    rng = np.random.default_rng(seed)
    t = cfg.image_tokens
    if 1 + images_per_row * (t + 2) > seq_len // 2:
        raise SystemExit(
            f"seq_len {seq_len} is too short for {images_per_row} image(s) of {t} tokens in the first half of each row"
        )
    ids = rng.integers(3, cfg.text.vocab_size, size=(rows, seq_len)).astype(np.int32)
    ids[:, 0] = cfg.text.bos_token_id
    for k in range(images_per_row):
        start = 1 + k * (t + 2)
        ids[:, start : start + t] = -1
    loss_mask = np.zeros((rows, seq_len - 1), np.int32)
    loss_mask[:, seq_len // 2 - 1 :] = 1  # targets ids[:, seq_len//2:]
    v = cfg.vision
    pixels = rng.normal(size=(rows, images_per_row, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return {
        "input_ids": ids,
        "attention_mask": np.ones((rows, seq_len), np.int32),
        "loss_mask": loss_mask,
        "pixel_values": pixels,
        "image_mask": np.ones((rows, images_per_row), np.int32),
        "skipped": np.zeros(rows, np.int32),
    }


def forward_flops(cfg, *, rows: int, seq_len: int, images: int) -> float:
    """The forward pass counted like `train_step_flops`: 2·N per token and tower, attention forward once."""
    from owl_jax.training.flops import tower_matmul_params

    n = tower_matmul_params(cfg.replace(lora=None))
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    tokens_v, queries = images * v.num_positions, images * cfg.num_query_tokens
    flops = 2 * (n["vision"] * tokens_v + n["abstractor"] * queries + n["llm"] * rows * seq_len)
    flops += 4 * v.num_layers * images * v.num_positions**2 * v.hidden_size
    flops += 4 * a.num_layers * queries * (cfg.num_query_tokens + v.num_positions) * a.hidden_size
    flops += 0.5 * 4 * t.num_layers * rows * seq_len**2 * t.hidden_size
    return float(flops)


def step_flops(cfg, step: str, shape: dict) -> float:
    from owl_jax.training.flops import train_step_flops

    rows, seq_len = shape["rows"], shape["seq_len"]
    images = rows * shape["images_per_row"]
    if step == "forward":
        return forward_flops(cfg, rows=rows, seq_len=seq_len, images=images)
    return train_step_flops(cfg, step, rows=rows, seq_len=seq_len, images=images)


# ------------------------------------------------------------------------------------------------
# timing
def timed(run: Callable[[], Any], block: Callable[[Any], Any], *, warmup: int, repeats: int):
    """(first-call seconds, list of timed seconds, last output). With `warmup` 0 the first call is
    one of the `repeats` timed ones."""
    return timed_together([(run, block, warmup, repeats)])[0]


def timed_together(entries, between: Callable[[], Any] = lambda: None) -> list:
    """`timed` for several `(run, block, warmup, repeats)` at once: each one's first call and warmup
    runs in turn, then their timed runs alternate one at a time (those with fewer repeats drop out
    first), so that a slow spell of the machine falls on all of them alike. `between` runs (untimed)
    before each call after the first."""
    state = []
    for i, (run, block, warmup, _) in enumerate(entries):
        if i:
            between()
        t0 = time.perf_counter()
        out = block(run())
        first = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            out = block(run())
        state.append([first, [] if warmup else [first], out])
    while any(len(st[1]) < entry[3] for st, entry in zip(state, entries)):
        for st, (run, block, _, repeats) in zip(state, entries):
            if len(st[1]) < repeats:
                between()
                t0 = time.perf_counter()
                st[2] = block(run())
                st[1].append(time.perf_counter() - t0)
    return [tuple(st) for st in state]


def settle() -> None:
    """Let the other framework's worker threads stop spinning before the next measurement."""
    time.sleep(0.3)


def gemm_shapes(cfg, shape: dict) -> list[tuple[int, int, int]]:
    v, t = cfg.vision, cfg.text
    tokens = shape["rows"] * shape["seq_len"]
    vit_tokens = shape["rows"] * shape["images_per_row"] * v.num_positions
    shapes = [
        (tokens, t.hidden_size, 4 * t.hidden_size),
        (tokens, t.hidden_size, t.intermediate_size),
        (vit_tokens, v.hidden_size, v.intermediate_size),
    ]
    return list(dict.fromkeys(shapes))


def _rate(call: Callable[[], Any], block: Callable[[Any], Any], flops: float, tries: int) -> float:
    block(call())
    t0 = time.perf_counter()
    block(call())
    single = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, math.ceil(0.05 / single))  # ≥ 50 ms per timed batch
    best = math.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = call()
        block(out)
        best = min(best, (time.perf_counter() - t0) / inner)
    return flops / best


def gemm_rates(shapes, tries: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"shapes": [list(s) for s in shapes], "jax": {}, "torch": {}}
    for precision, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        per_shape = []
        for m, k, n in shapes:
            a = jnp.asarray(rng.normal(size=(m, k)), dt)
            b = jnp.asarray(rng.normal(size=(k, n)), dt)
            f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
            per_shape.append(_rate(lambda: f(a, b), jax.block_until_ready, 2.0 * m * k * n, tries))
        result["jax"][precision] = {"best": max(per_shape), "per_shape": per_shape}
    settle()
    for precision, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        per_shape = []
        for m, k, n in shapes:
            a = torch.from_numpy(rng.normal(size=(m, k)).astype(np.float32)).to(dt)
            b = torch.from_numpy(rng.normal(size=(k, n)).astype(np.float32)).to(dt)
            per_shape.append(_rate(lambda: torch.matmul(a, b), lambda x: x, 2.0 * m * k * n, tries))
        result["torch"][precision] = {"best": max(per_shape), "per_shape": per_shape}
    settle()
    return result


# ------------------------------------------------------------------------------------------------
# owl_jax
def host_params(cfg) -> dict:
    from flax import nnx

    from owl_jax.checkpoint import nest
    from owl_jax.modeling import Owl

    model = Owl(cfg.replace(lora=None), rngs=nnx.Rngs(0))
    flat = {
        tuple(str(k) for k in p): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    return nest(flat)


def jax_runner(cfg, step: str, params: dict, batch: dict, mesh):
    """(run, block, check, param counts) for one owl_jax step."""
    import jax
    import jax.numpy as jnp

    from owl_jax.checkpoint import flatten
    from owl_jax.sharding import use_mesh
    from owl_jax.training.run import adapt_params
    from owl_jax.training.trainer import Trainer

    answers = float(((batch["loss_mask"] > 0) & (batch["input_ids"][:, 1:] >= 0)).sum())
    if step == "forward":
        trainer = Trainer(cfg, stage="stage1", mesh=mesh, optim=OPTIM, total_steps=TOTAL_STEPS)
        device_params = jax.device_put(params, trainer.param_shardings)
        gb = trainer.global_batch(batch)
        with use_mesh(mesh):
            fn = jax.jit(lambda p, b: trainer.logits(p, b, None))

        def run():
            with use_mesh(mesh):
                return fn(device_params, gb)

        def check(logits):
            expected = (*batch["input_ids"].shape, cfg.text.vocab_size)
            assert logits.shape == expected and logits.dtype == jnp.float32, (logits.shape, logits.dtype)
            assert bool(jnp.isfinite(logits).all()), "owl_jax: non-finite logits"

        counts = {"trainable": 0, "total": trainer.num_trainable + trainer.num_frozen}
        return run, jax.block_until_ready, check, counts

    trainer = Trainer(cfg, stage=step, mesh=mesh, optim=OPTIM, total_steps=TOTAL_STEPS)
    if step == "stage2":
        params = adapt_params(flatten(params), cfg, None, seed=0)
    holder = {"state": trainer.init_state(params, seed=0)}
    gb = trainer.global_batch(batch)

    def run():
        holder["state"], metrics = trainer.train_step(holder["state"], gb)
        return holder["state"], metrics

    def check(out):
        _, metrics = out
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        assert math.isfinite(m["loss"]) and m["loss"] > 0, f"owl_jax: loss {m['loss']}"
        assert m["nonfinite_steps"] == 0, "owl_jax: non-finite gradients"
        assert m["tokens"] == answers, (m["tokens"], answers)
        assert m["grad_norm"] > 0, "owl_jax: zero gradient"
        return m["loss"]

    counts = {"trainable": trainer.num_trainable, "total": trainer.num_trainable + trainer.num_frozen}
    return run, jax.block_until_ready, check, counts


# ------------------------------------------------------------------------------------------------
# report
class OtherLoad:
    """The share of this process's cores that other processes kept busy between `start` and `stop`.

    Busy time of the allowed CPUs (from the kernel's per-CPU counters) minus this process's own CPU time,
    over wall time × cores; None where the counters cannot be read.
    """

    def __init__(self):
        self.cpus = sorted(os.sched_getaffinity(0))
        self.start_at = self._read()

    def _read(self):
        try:
            busy = 0
            with open("/proc/stat") as f:
                for line in f:
                    name, *fields = line.split()
                    if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                        v = [int(x) for x in fields]
                        busy += v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
            own = os.times()
            return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> float | None:
        end = self._read()
        if self.start_at is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start_at))
        return max(0.0, (busy - own) / (wall * len(self.cpus)))


def environment() -> dict[str, Any]:
    import jax
    import torch
    import transformers

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {
        "cpu": cpu,
        "isa": isa,
        "cores": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_devices": len(jax.devices()),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft_version,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "loadavg_start": list(os.getloadavg()),
    }


def describe(cfg, lora, shape) -> str:
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    return (
        f"ViT {v.hidden_size}x{v.num_layers} ({v.num_heads} heads, mlp {v.intermediate_size}, {v.image_size}px/"
        f"{v.patch_size} = {v.num_positions} tokens); abstractor {a.hidden_size}x{a.num_layers} ({a.num_heads} heads, "
        f"mlp {a.intermediate_size}, {cfg.num_query_tokens} queries); LLaMA {t.hidden_size}x{t.num_layers} "
        f"({t.num_heads} heads, mlp {t.intermediate_size}, vocab {t.vocab_size}); LoRA r={lora.rank} on q/v; "
        f"batch {shape['rows']} rows x {shape['seq_len']} tokens, {shape['images_per_row']} image(s)/row"
    )


def markdown(results: list[dict], env: dict, gemm: dict, desc: str, repeats: int, torch_repeats: int) -> str:
    share = "n/a" if env.get("other_cpu_share") is None else f"{100 * env['other_cpu_share']:.0f}%"
    out = [
        f"CPU: {env['cpu']} ({', '.join(env['isa']) or 'no AVX-512 flags'}), {env['cores']} cores "
        f"(torch threads {env['torch_threads']}); jax {env['jax']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, python {env['python']}; load average "
        f"{env['loadavg_start'][0]:.2f} at start; other processes' share of these cores during the run: {share}"
        + (f"; GLIBC_TUNABLES={env['glibc_tunables']}" if env.get("glibc_tunables") else ""),
        *(
            [
                f"WARNING: other processes kept {share} of these {env['cores']} cores busy during the run: the "
                "timings are unreliable"
            ]
            if (env.get("other_cpu_share") or 0.0) > 0.1
            else []
        ),
        f"Model: {desc}",
        "GEMM rate (GFLOP/s, best over config-shaped matmuls): JAX fp32 "
        f"{gemm['jax']['float32']['best'] / 1e9:.1f}, bf16 {gemm['jax']['bfloat16']['best'] / 1e9:.1f}; "
        f"PyTorch fp32 {gemm['torch']['float32']['best'] / 1e9:.1f}, bf16 "
        f"{gemm['torch']['bfloat16']['best'] / 1e9:.1f}",
        "",
        "| step | precision | owl_jax (ms) | PyTorch (ms) | owl_jax / PyTorch | GFLOP | matmul floor (ms) "
        "| owl_jax / floor | PyTorch / floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        torch_ms = f"{r['torch_ms']:.1f} ({r['torch_attn']})" if r.get("torch_ms") else "n/a"
        ratio = f"{r['jax_ms'] / r['torch_ms']:.2f}" if r.get("torch_ms") else "n/a"
        tf = f"{r['torch_ms'] / r['floor_ms']:.2f}" if r.get("torch_ms") else "n/a"
        out.append(
            f"| {STEP_NAMES[r['step']]} | {PRECISIONS[r['precision']]} | {r['jax_ms']:.1f} | {torch_ms} | "
            f"{ratio} | {r['flops'] / 1e9:.2f} | {r['floor_ms']:.1f} | {r['jax_ms'] / r['floor_ms']:.2f} | {tf} |"
        )
    out += [
        "",
        f"Times: median of {repeats} after warmup"
        + (f" (PyTorch: of {torch_repeats})" if torch_repeats != repeats else "")
        + ", both frameworks in one process; PyTorch column: the faster "
        "attention implementation (in parentheses). bf16 = bfloat16 compute over float32 parameters "
        "(owl_jax dtype='bfloat16'; PyTorch autocast).",
        "FLOPs: owl_jax.training.flops.train_step_flops (forward: 2·N per token plus attention, once). "
        "Matmul floor = FLOPs / the JAX-measured GEMM rate at that precision (jitted matmul, bf16 inputs "
        "with float32 accumulation).",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="small")
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override a preset size, e.g. text.num_layers=8 or num_query_tokens=64",
    )
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--images-per-row", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--steps", nargs="+", choices=list(STEP_NAMES), default=list(STEP_NAMES))
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--torch-attn", nargs="+", choices=["sdpa", "eager"], default=["sdpa", "eager"])
    parser.add_argument(
        "--dropout",
        action="store_true",
        help="abstractor attention dropout 0.1 and LoRA dropout 0.05 on both sides (default: none)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (the first JAX run compiles)")
    parser.add_argument("--torch-repeats", type=int, default=None, help="PyTorch's timed runs (default: --repeats)")
    parser.add_argument("--torch-warmup", type=int, default=None, help="PyTorch's untimed runs (default: --warmup)")
    parser.add_argument("--gemm-tries", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument(
        "--unrolled",
        action="store_true",
        help="owl_jax runs its layers unrolled (scan_layers=False) instead of scanned",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="alternate owl_jax's and PyTorch's timed runs one at a time (default: all of one, then the other)",
    )
    parser.add_argument(
        "--huge-pages",
        action="store_true",
        help="run again with glibc's malloc on transparent huge pages, as owl-train --huge_pages does",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch_repeats = args.repeats if args.torch_repeats is None else args.torch_repeats
    torch_warmup = args.warmup if args.torch_warmup is None else args.torch_warmup
    if min(args.repeats, torch_repeats) < 1 or min(args.warmup, torch_warmup) < 0:
        parser.error("--repeats and --torch-repeats must be at least 1, --warmup and --torch-warmup at least 0")
    if args.huge_pages:
        from owl_jax.cli.host_memory import reexec_with_huge_pages

        note = reexec_with_huge_pages()  # returns in the re-run process, or where huge pages do not apply
        if note:
            print(f"--huge-pages: not applied: {note}", flush=True)

    import jax
    import torch

    from benchmarks import _torch_reference as ref
    from owl_jax.sharding import make_mesh

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.torch_threads or cores)
    env = environment()
    other_load = OtherLoad()
    cfg, lora, shape = build_config(args)
    desc = describe(cfg, lora, shape) + ("; owl_jax layers unrolled" if args.unrolled else "; owl_jax layers scanned")
    desc += "; owl_jax and PyTorch runs interleaved" if args.interleave else ""
    print(desc, flush=True)
    batch = make_batch(cfg, shape["rows"], shape["seq_len"], shape["images_per_row"])
    tbatch = ref.torch_batch(batch)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = host_params(cfg)

    print("measuring GEMM rates ...", flush=True)
    gemm = gemm_rates(gemm_shapes(cfg, shape), args.gemm_tries)

    results = []
    for step in args.steps:
        for precision in args.precisions:
            run_cfg = cfg.replace(
                dtype=precision, lora=lora if step == "stage2" else None, scan_layers=not args.unrolled
            )
            label = f"{step} {PRECISIONS[precision]}"
            run, block, check, jax_counts = jax_runner(run_cfg, step, params, batch, mesh)
            row = {"step": step, "precision": precision, "params": jax_counts, "torch": {}}

            def record_jax(first, times, out):
                row.update(
                    {
                        "jax_ms": statistics.median(times) * 1e3,
                        "jax_times_ms": [t * 1e3 for t in times],
                        "jax_first_call_s": first,
                        "jax_loss": check(out),
                    }
                )
                print(f"{label}: owl_jax {row['jax_ms']:.1f} ms (first call {first:.1f} s)", flush=True)

            def record_torch(impl, tcheck, first, times, out):
                row["torch"][impl] = {
                    "ms": statistics.median(times) * 1e3,
                    "times_ms": [t * 1e3 for t in times],
                    "first_call_s": first,
                    "loss": tcheck(out),
                }
                print(f"{label}: PyTorch {impl} {row['torch'][impl]['ms']:.1f} ms", flush=True)

            if not args.interleave:
                record_jax(*timed(run, block, warmup=args.warmup, repeats=args.repeats))
                del run
                settle()
            torch_runs = {}
            for impl in args.torch_attn:
                model = ref.TorchOwl(run_cfg, attn_implementation=impl, lora=step == "stage2", dropout=args.dropout)
                trun, tcheck = ref.make_step(model, step, tbatch, bf16=precision == "bfloat16", optim=OPTIM)
                counts = ref.param_counts(model)
                if counts != jax_counts:
                    raise SystemExit(f"{label}: parameter counts differ: owl_jax {jax_counts}, PyTorch {counts}")
                if args.interleave:
                    torch_runs[impl] = (trun, tcheck)
                else:
                    record_torch(impl, tcheck, *timed(trun, lambda x: x, warmup=torch_warmup, repeats=torch_repeats))
                    settle()
                del model, trun
            if args.interleave:  # owl_jax and every PyTorch variant in turn, one timed run each
                got = timed_together(
                    [(run, block, args.warmup, args.repeats)]
                    + [(trun, lambda x: x, torch_warmup, torch_repeats) for trun, _ in torch_runs.values()],
                    between=settle,
                )
                record_jax(*got[0])
                for (impl, (_, tcheck)), result in zip(torch_runs.items(), got[1:]):
                    record_torch(impl, tcheck, *result)
                del run, got, torch_runs
            if row["torch"]:
                best = min(row["torch"], key=lambda k: row["torch"][k]["ms"])
                row["torch_attn"], row["torch_ms"] = best, row["torch"][best]["ms"]
            row["flops"] = step_flops(run_cfg, step, shape)
            row["floor_ms"] = row["flops"] / gemm["jax"][precision]["best"] * 1e3
            results.append(row)

    env["other_cpu_share"] = other_load.stop()
    table = markdown(results, env, gemm, desc, args.repeats, torch_repeats)
    print("\n" + table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "env": env,
                    "args": vars(args),
                    "config": dataclasses.asdict(cfg),
                    "lora": dataclasses.asdict(lora),
                    "shape": shape,
                    "optim": OPTIM,
                    "gemm": gemm,
                    "rows": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
