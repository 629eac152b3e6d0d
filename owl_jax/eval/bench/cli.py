"""Run a standard benchmark with a checkpoint and score it with the benchmark's official metric.

    python -m owl_jax.eval.bench --task vqav2|coco_caption|pope|mme|mmbench|scienceqa_img --data DIR \\
        --checkpoint CKPT [--out DIR] [--batch-size 8] [--num-beams 1] [--max-new-tokens 128] [--limit N] \\
        [--tokenizer PATH] [--dtype float32|bfloat16] [--devices N] [--fsdp 1] [--tensor 1] [--unstack-layers] \\
        [--quantize int8|int4] [--overwrite]

(`owl-eval bench ...` is the same command.) `--data` is the benchmark's folder in its official layout (see
`owl_jax.eval.bench.layouts`). The run writes `predictions.jsonl`, `results.json` and `results.md` into
`--out` and prints the table; the same command run again resumes an interrupted run. Decoding is greedy
(`--num-beams N`: beam search) and ends at EOS or after `--max-new-tokens` (LLaVA's evaluations use 128).
Batches are split over the devices (the mesh's data axis; `--fsdp`/`--tensor` shard the model instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from owl_jax.eval.bench.runner import RESULTS_JSON, RESULTS_MD, markdown_report, run_task
from owl_jax.eval.bench.tasks import TASKS, load_task
from owl_jax.quant.spec import add_quantize_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, help="the benchmark's folder in its official layout")
    p.add_argument("--checkpoint", required=True, help="HF-layout or converted checkpoint folder")
    p.add_argument("--out", default=None, help="output folder (default: bench/<task>)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch (rounded up to the devices)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (MME: N images)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder, if the checkpoint has none")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--lora", default=None, help="a LoRA adapter folder to apply")
    add_quantize_argument(p)
    p.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    p.add_argument("--fsdp", type=int, default=1, help="mesh fsdp axis size (the data axis takes the rest)")
    p.add_argument("--tensor", type=int, default=1, help="mesh tensor axis size")
    p.add_argument(
        "--unstack-layers",
        action="store_true",
        help="decode from one weight buffer per LLM layer (faster on a GPU; the LLM layers' memory twice)",
    )
    p.add_argument("--overwrite", action="store_true", help="discard the predictions already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _usage_error(args: argparse.Namespace) -> str | None:
    for name in ("batch_size", "num_beams", "max_new_tokens", "limit", "devices", "fsdp", "tensor"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1, got {value}"
    return None


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What the predictions depend on (recorded in run.json; a resumed run must match)."""
    path = lambda p: None if p is None else os.path.abspath(p)  # noqa: E731
    return {
        "task": args.task,
        "data": path(args.data),
        "checkpoint": path(args.checkpoint),
        "tokenizer": path(args.tokenizer),
        "lora": path(args.lora),
        "dtype": args.dtype,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        # recorded only when set, so runs from before the option resume as they were
        **({"quantize": args.quantize} if getattr(args, "quantize", None) else {}),
    }


def make_mesh_for(args: argparse.Namespace) -> Any:
    """The `(data, fsdp, tensor)` mesh over the devices asked for, or None for a single device."""
    import jax

    from owl_jax.sharding import make_mesh

    devices = jax.devices()
    if args.devices is not None:
        if args.devices > len(devices):
            raise ValueError(f"--devices {args.devices}: only {len(devices)} devices are available")
        devices = devices[: args.devices]
    if len(devices) == 1:
        return None
    return make_mesh(data=-1, fsdp=args.fsdp, tensor=args.tensor, devices=devices)


def make_answerer(args: argparse.Namespace) -> Any:
    """Load the model on its mesh and return the `BatchAnswerer` of these arguments."""
    import owl_jax
    from owl_jax.data.processor import OwlProcessor, layout_of
    from owl_jax.eval.bench.answering import BatchAnswerer, batch_rows
    from owl_jax.inference.generate import GenerationConfig, Generator

    mesh = make_mesh_for(args)
    model, processor = owl_jax.from_pretrained(
        args.checkpoint,
        dtype=args.dtype,
        lora=args.lora,
        mesh=mesh,
        quantize=getattr(args, "quantize", None),
        show_progress=not args.quiet,
    )
    if args.tokenizer is not None:
        cfg = model.config
        processor = OwlProcessor(
            args.tokenizer, image_size=cfg.vision.image_size, image_tokens=cfg.image_tokens, layout=layout_of(cfg)
        )
    if processor is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.model or tokenizer.json; pass --tokenizer")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        eos_token_id=processor.eos_token_id,
        bos_token_id=processor.bos_token_id,
        pad_token_id=processor.pad_token_id,
    )
    generator = Generator(model, mesh=mesh, unstack_layers=args.unstack_layers)
    return BatchAnswerer(model, processor, config, batch_rows(args.batch_size, mesh), generator=generator)


def run(args: argparse.Namespace) -> int:
    """Load the task, answer what is missing, score, write and print; returns the exit status."""
    problem = _usage_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("bench", args.task)
    start = time.perf_counter()
    try:  # fail on missing or malformed files before spending time on the model
        task = load_task(args.task, args.data).limited(args.limit)
        missing = task.missing_images()
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"image {missing[0]} does not exist{more}")
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        results = run_task(
            task,
            out,
            lambda: make_answerer(args),
            settings_of(args),
            overwrite=args.overwrite,
            show_progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(f"interrupted: the answers so far are kept in {out}; run the same command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_report(task, results))
    print(
        f"{results['asked_now']} items answered now, {results['items']} in {out}; wrote "
        f"{os.path.join(out, RESULTS_JSON)} and {RESULTS_MD} ({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m owl_jax.eval.bench ...`; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m owl_jax.eval.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return run(p.parse_args(argv))
