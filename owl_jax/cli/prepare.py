"""`owl-prepare` (or `python -m owl_jax.data.prepare`): turn a data source into ArrayRecord shards.

    owl-prepare --format llava --input llava_instruct_150k.json --image-root coco/train2014 \\
        --output data/llava/train

See `owl_jax.data.prepare` for what it writes and when it fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from owl_jax.data import prepare as prepare_module
from owl_jax.data import sources
from owl_jax.data.prepare import FORMATS, PrepareError, prepare


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="owl-prepare",
        description=prepare_module.__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument(
        "--input",
        nargs="+",
        default=[],
        metavar="PATH",
        help="input files (webdataset: .tar files or folders of them); not used with --format tfds",
    )
    p.add_argument("--image-root", help="folder of the images named in the inputs (default: each input's folder)")
    p.add_argument("--output", required=True, metavar="PREFIX", help="output prefix, e.g. data/llava/train")
    p.add_argument("--examples-per-shard", type=int, default=10_000)
    p.add_argument(
        "--max-skip-fraction",
        type=float,
        default=0.01,
        help="fail if more than this fraction of the items had to be skipped",
    )
    p.add_argument("--limit", type=int, help="stop after writing this many examples")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's shards under --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = p.add_argument_group("tfds (--format tfds)")
    t.add_argument("--tfds-name", help="dataset name, e.g. coco_captions")
    t.add_argument("--tfds-split", default="train")
    t.add_argument("--data-dir", help="TFDS data_dir holding the prepared dataset")
    t.add_argument("--image-key", default="image", help="image feature; nested keys as a/b")
    t.add_argument("--caption-key", default="caption", help="caption feature; nested keys as a/b")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with an error message for unusable arguments or data,
    130 when interrupted)."""
    args = _parser().parse_args(argv)
    tfds_options = {}
    if args.format == "tfds":
        tfds_options = {
            "tfds_name": args.tfds_name,
            "tfds_split": args.tfds_split,
            "data_dir": args.data_dir,
            "image_key": args.image_key,
            "caption_key": args.caption_key,
        }
    try:
        report = prepare(
            args.format,
            args.input,
            args.output,
            image_root=args.image_root,
            examples_per_shard=args.examples_per_shard,
            max_skip_fraction=args.max_skip_fraction,
            limit=args.limit,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            **tfds_options,
        )
    except (PrepareError, sources.SourceError, OSError) as e:  # OSError: an output folder that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.output} is as it was before this run", file=sys.stderr)
        return 130
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
