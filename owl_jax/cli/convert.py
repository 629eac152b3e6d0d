"""`owl-convert` (or `python convert_weights.py`): convert mPLUG-Owl weights between the released PyTorch (HF)
layout and owl_jax.

    owl-convert import HF_DIR OUT_DIR [--dtype float32|bfloat16|float16] [--lora ADAPTER] [--merge-lora]
                       [--quantize int8|int4 [--group-size 128] [--quantize-vision] [--quantize-lm-head]]
    owl-convert export CKPT_DIR OUT_DIR [--format safetensors|bin] [--merge-lora]
    owl-convert init --clip CLIP_DIR --llama LLAMA_DIR OUT_DIR [--num-query-tokens 64]

`import` writes a folder that `owl_jax.from_pretrained` and `export` accept; with `--quantize` the language
model's linear weights are stored as int8 (per-channel scales) or int4 (per-group scales), each kernel
quantized as it is read (docs/quantization.md), and `from_pretrained` loads the folder quantized
(`export` refuses it: the float weights are gone). `export` writes the released
layout (sharded, with an index) that the released PyTorch code loads with strict=True; LoRA parameters
go to `OUT_DIR/adapter` as a peft adapter unless `--merge-lora`. `init` starts a fresh model (stage 1)
from an HF CLIP vision tower and an HF LLaMA, with a randomly initialised abstractor.

Exit status: 0 done; 2 a bad input or usage (an `error:` line naming the file or key); 1 a fault of the
environment (`error: cannot write OUT/...: No space left on device`: disk full, read-only, no permission).
A failed run leaves nothing behind; leftovers of killed runs are removed by the next run into OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from collections.abc import Iterator


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="HF PyTorch folder → owl_jax folder")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="parameter dtype (default: the source's)",
    )
    imp.add_argument("--lora", default=None, help="peft adapter folder or trainer checkpoint to add")
    imp.add_argument("--merge-lora", action="store_true", help="fold the adapter into the weights")
    imp.add_argument("--lora-alpha", type=float, default=None, help="adapter alpha when it has no adapter_config.json")
    imp.add_argument(
        "--quantize", choices=["int8", "int4"], default=None, help="store the linear weights quantized (weight-only)"
    )
    imp.add_argument("--group-size", type=int, default=128, help="int4: inputs per scale (default 128)")
    imp.add_argument("--quantize-vision", action="store_true", help="quantize the ViT's linear layers too")
    imp.add_argument("--quantize-lm-head", action="store_true", help="quantize the language model's head too")

    exp = sub.add_parser("export", help="owl_jax folder → HF PyTorch layout")
    exp.add_argument("ckpt_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--format", choices=["safetensors", "bin"], default="safetensors")
    exp.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="output dtype (default: the stored one)",
    )
    exp.add_argument("--merge-lora", action="store_true", help="merge adapters instead of writing OUT_DIR/adapter")
    exp.add_argument(
        "--max-shard-size", default=None, help="largest shard, e.g. 5GB or 500MB (default: 5GB safetensors, 1GB .bin)"
    )

    init = sub.add_parser("init", help="fresh model from HF CLIP and LLaMA checkpoints")
    init.add_argument("out_dir")
    init.add_argument("--clip", required=True, help="HF CLIPVisionModel or CLIPModel folder")
    init.add_argument("--llama", required=True, help="HF LlamaForCausalLM (or BloomForCausalLM) folder")
    init.add_argument("--num-query-tokens", type=int, default=64)
    init.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    init.add_argument("--seed", type=int, default=0, help="seed of the abstractor's random initialisation")

    for sp in (imp, exp, init):
        sp.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one conversion; returns the exit status.

    0: done. 2: a bad input or usage (an unreadable or inconsistent checkpoint or config, an existing
    output without --overwrite), with a one-line message naming the file or key. 1: a fault of the
    environment (the output cannot be written: disk full, read-only, no permission; an input cannot be
    read), with a one-line message naming the path and the OS's reason. Notes (e.g. unfinished outputs of
    killed runs that were cleaned up) go to stderr as `note: ...` lines.
    """
    args = _parser().parse_args(argv)
    from owl_jax import checkpoint as convert
    from owl_jax.checkpoint import CheckpointError, CheckpointWriteError, parse_size
    from owl_jax.config import ConfigError

    start = time.perf_counter()
    progress = not args.quiet
    with _notes_to_stderr():
        try:
            out = _run(convert, args, progress, parse_size)
        except CheckpointWriteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # an input the OS will not let us read (permissions, I/O error, ...)
            where = f"cannot read {e.filename}: " if getattr(e, "filename", None) else ""
            print(f"error: {where}{e.strerror or e}", file=sys.stderr)
            return 1
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def _run(convert, args: argparse.Namespace, progress: bool, parse_size) -> str:
    if args.command == "import":
        spec = None
        if args.quantize:
            from owl_jax.quant.spec import QuantSpec

            spec = QuantSpec(
                mode=args.quantize,
                group_size=args.group_size,
                include_vision=args.quantize_vision,
                lm_head=args.quantize_lm_head,
            ).validate()
        elif args.quantize_vision or args.quantize_lm_head:
            raise ValueError("--quantize-vision and --quantize-lm-head need --quantize int8|int4")
        return convert.import_checkpoint(
            args.hf_dir,
            args.out_dir,
            dtype=args.dtype,
            lora=args.lora,
            merge_lora=args.merge_lora,
            lora_alpha=args.lora_alpha,
            quantize=spec,
            overwrite=args.overwrite,
            show_progress=progress,
        )
    if args.command == "export":
        from owl_jax.quant.load import stored_quantization

        if stored_quantization(args.ckpt_dir) is not None:
            raise convert.CheckpointError(
                f"{args.ckpt_dir} holds quantized weights; export needs float weights (export the folder it "
                f"was quantized from)"
            )
        return convert.export_checkpoint(
            args.ckpt_dir,
            args.out_dir,
            fmt=args.format,
            dtype=args.dtype,
            merge_lora=args.merge_lora,
            max_shard_bytes=args.max_shard_size and parse_size(args.max_shard_size),
            overwrite=args.overwrite,
            show_progress=progress,
        )
    return convert.init_from_towers_checkpoint(
        args.clip,
        args.llama,
        args.out_dir,
        num_query_tokens=args.num_query_tokens,
        dtype=args.dtype,
        seed=args.seed,
        overwrite=args.overwrite,
        show_progress=progress,
    )


@contextlib.contextmanager
def _notes_to_stderr() -> Iterator[None]:
    """The checkpoint package's warnings (logger `owl_jax.checkpoint`) as one `note: ...` line each."""
    logger = logging.getLogger("owl_jax.checkpoint")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    handler.setLevel(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


if __name__ == "__main__":
    sys.exit(main())
