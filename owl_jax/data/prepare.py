"""Turn a data source into ArrayRecord shards of `Example`s, the only thing training reads.

    python -m owl_jax.data.prepare --format llava --input llava_instruct_150k.json \\
        --image-root coco/train2014 --output data/llava/train

writes `data/llava/train-00000-of-0000N.array_record` and `data/llava/train.manifest.json` (what was read,
what was written, and what was skipped and why). Bad items (a missing or corrupt image, a malformed line,
an empty or non-alternating conversation) are skipped and counted; if more than `--max-skip-fraction` of
the items were skipped the run fails and leaves no shards, since that usually means a wrong `--image-root`
or the wrong `--format` rather than a few bad items. The shards and manifest are written under temporary
names and replace an earlier dataset under the same prefix (`--overwrite`) only once all are complete, so a
failed or interrupted run leaves that dataset as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from etils import epath

from owl_jax.data import records, sources
from owl_jax.paths import as_path, is_remote

FORMATS = ("mplug_jsonl", "llava", "alpaca", "sharegpt", "captions", "webdataset", "tfds")
TFDS_OPTIONS = {
    "tfds_name": None,
    "tfds_split": "train",
    "data_dir": None,
    "image_key": "image",
    "caption_key": "caption",
}
# How many skipped items of each reason the manifest and the error message show.
EXAMPLES_PER_REASON = 5


class PrepareError(RuntimeError):
    """The prepare step cannot produce a usable dataset (bad arguments, unusable inputs, too many skips)."""


@dataclasses.dataclass
class PrepareReport:
    """What one prepare run read, wrote and skipped (also written as the manifest)."""

    format: str
    inputs: list[str]
    written: int = 0
    tasks: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_examples: list[dict[str, str]] = dataclasses.field(default_factory=list)
    shards: list[str] = dataclasses.field(default_factory=list)
    manifest: str = ""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def skip_fraction(self) -> float:
        seen = self.written + self.num_skipped
        return self.num_skipped / seen if seen else 0.0

    def top_reasons(self, n: int = 3) -> str:
        """The `n` most common skip reasons as "reason x count, ..."."""
        ranked = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return ", ".join(f"{reason} x{count}" for reason, count in ranked)

    def summary(self) -> str:
        """A few lines for the end of a run."""
        tasks = ", ".join(f"{task} {n}" for task, n in sorted(self.tasks.items())) or "none"
        lines = [
            f"prepared {self.written} examples ({tasks}) from {self.format} into {len(self.shards)} shard(s)",
            f"skipped {self.num_skipped} ({self.skip_fraction:.2%})"
            + (f": {self.top_reasons(len(self.skipped))}" if self.skipped else ""),
        ]
        if self.manifest:
            lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


class _Tally:
    """Counts outcomes as they stream past, keeping a few skipped items of each reason."""

    def __init__(self, report: PrepareReport):
        self.report = report
        self.tasks: collections.Counter = collections.Counter()
        self.skipped: collections.Counter = collections.Counter()

    def add(self, outcome: sources.Outcome) -> bool:
        """Count `outcome`; True if it is an example to write."""
        if isinstance(outcome, sources.Skip):
            self.skipped[outcome.reason] += 1
            if self.skipped[outcome.reason] <= EXAMPLES_PER_REASON:
                self.report.skipped_examples.append(dataclasses.asdict(outcome))
            return False
        self.tasks[outcome.task] += 1
        self.report.written += 1
        return True

    def finish(self) -> None:
        self.report.tasks, self.report.skipped = dict(self.tasks), dict(self.skipped)


def read_source(
    format: str, inputs: Sequence[str], *, image_root: str | None = None, **tfds_options: Any
) -> Iterator[sources.Outcome]:
    """All outcomes (examples and skips) of `inputs` read as `format`, input after input."""
    if format == "tfds":
        options = {**TFDS_OPTIONS, **tfds_options}
        yield from sources.tfds_captions(
            options["tfds_name"],
            options["tfds_split"],
            options["data_dir"],
            options["image_key"],
            options["caption_key"],
        )
        return
    if format == "webdataset":
        yield from sources.webdataset(list(inputs))
        return
    for path in inputs:
        if format == "mplug_jsonl":
            yield from sources.mplug_jsonl(path, image_root)
        elif format == "llava":
            yield from sources.llava_json(path, image_root)
        elif format == "alpaca":
            yield from sources.alpaca_json(path)
        elif format == "sharegpt":
            yield from sources.sharegpt_json(path)
        elif format == "captions":
            yield from sources.captions(path, image_root)
        else:
            raise PrepareError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")


def _check_arguments(
    format: str,
    inputs: Sequence[str],
    examples_per_shard: int,
    max_skip_fraction: float,
    limit: int | None,
    tfds_options: dict[str, Any],
) -> None:
    if format not in FORMATS:
        raise PrepareError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    unknown = set(tfds_options) - set(TFDS_OPTIONS)
    if unknown:
        raise PrepareError(f"unknown options {sorted(unknown)}; the TFDS options are {sorted(TFDS_OPTIONS)}")
    if format == "tfds":
        if not tfds_options.get("tfds_name"):
            raise PrepareError("--format tfds needs --tfds-name")
    else:
        if tfds_options:
            raise PrepareError(f"{sorted(tfds_options)} only apply to --format tfds")
        if not inputs:
            raise PrepareError(f"--format {format} needs at least one --input")
        missing = [p for p in inputs if not os.path.exists(p)]
        if missing:
            raise PrepareError(f"input not found: {', '.join(missing)}")
    if examples_per_shard < 1:
        raise PrepareError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise PrepareError(f"max_skip_fraction must be between 0 and 1, got {max_skip_fraction}")
    if limit is not None and limit < 1:
        raise PrepareError(f"limit must be >= 1, got {limit}")


def _too_many_skips(report: PrepareReport, max_skip_fraction: float) -> str:
    seen = report.written + report.num_skipped
    shown = "\n".join(f"  {s['item']}: {s['reason']}: {s['detail']}" for s in report.skipped_examples[:8])
    return (
        f"{report.format} input {', '.join(report.inputs)}: skipped {report.num_skipped} of {seen} "
        f"items ({report.skip_fraction:.1%}), more than the allowed {max_skip_fraction:.1%}. Most common "
        f"reasons: {report.top_reasons()}. For example:\n{shown}\n"
        f"Check --image-root and --format, or raise --max-skip-fraction if these items are expected to be bad. "
        f"No shards were kept."
    )


def prepare(
    format: str,
    inputs: Sequence[str],
    output_prefix: str,
    *,
    image_root: str | None = None,
    examples_per_shard: int = 10_000,
    max_skip_fraction: float = 0.01,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **tfds_options: Any,
) -> PrepareReport:
    """Read `inputs` as `format` and write ArrayRecord shards plus a manifest under `output_prefix`.

    Args:
      format: one of `FORMATS`.
      inputs: input files (for "webdataset" also folders of `.tar` shards); ignored for "tfds".
      output_prefix: shards go to `{prefix}-0000i-of-0000n.array_record`, the manifest to
        `{prefix}.manifest.json`.
      image_root: folder that relative image names are taken from (default: each input file's folder).
      examples_per_shard: shard size.
      max_skip_fraction: the largest allowed fraction of skipped items among all items read.
      limit: stop after writing this many examples.
      overwrite: replace the shards and manifest of an earlier run under the same prefix once the new ones
        are complete (otherwise that is an error, since mixing shards of two runs would silently corrupt the
        dataset).
      progress: show a progress bar on stderr.
      **tfds_options: for "tfds": `tfds_name` (required), `tfds_split`, `data_dir`, `image_key`,
        `caption_key`.

    Returns:
      The report, also saved as the manifest.

    Raises:
      PrepareError: bad arguments, existing outputs without `overwrite`, nothing to write, or more than
        `max_skip_fraction` of the items skipped (then no new files are left behind and an earlier dataset
        is kept, as on any other failure).
      sources.SourceError: an input that cannot be read at all (names the file).
    """
    from tqdm import tqdm

    inputs = [os.fspath(p) for p in inputs]
    _check_arguments(format, inputs, examples_per_shard, max_skip_fraction, limit, tfds_options)
    previous = records.dataset_files(output_prefix)
    if previous and not overwrite:
        raise PrepareError(
            f"{output_prefix} already holds a prepared dataset ({len(previous)} files, e.g. "
            f"{previous[0]}); pass --overwrite to replace it"
        )
    # The new dataset is written under temporary names and replaces the old one only once it is complete.
    records.remove_files(records.temporary_files(output_prefix))  # left by a run that was killed

    if format == "tfds":
        options = {**TFDS_OPTIONS, **tfds_options}
        inputs = [f"tfds:{options['tfds_name']}/{options['tfds_split']}"]
    report = PrepareReport(format=format, inputs=inputs)
    tally = _Tally(report)
    bar = tqdm(desc=f"prepare {format}", unit=" items", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def examples() -> Iterator[records.Example]:
        for outcome in read_source(format, inputs, image_root=image_root, **tfds_options):
            bar.update(1)
            if tally.add(outcome):
                yield outcome
                if limit is not None and report.written >= limit:
                    return
            if bar.n % 1000 == 0:
                bar.set_postfix(written=report.written, skipped=sum(tally.skipped.values()), refresh=False)

    try:
        tmp_shards = records.write_temporary_shards(examples(), output_prefix, examples_per_shard=examples_per_shard)
    finally:
        bar.close()
    tmp_manifest = None
    try:
        tally.finish()
        if report.skip_fraction > max_skip_fraction:
            raise PrepareError(_too_many_skips(report, max_skip_fraction))
        if report.written == 0:
            raise PrepareError(
                f"no examples found in {', '.join(inputs)}"
                + (f" (all {report.num_skipped} items skipped: {report.top_reasons()})" if report.num_skipped else "")
            )
        report.shards = records.shard_paths(output_prefix, len(tmp_shards))
        tmp_manifest = records.temporary_path(output_prefix, "manifest.json")
        _write_manifest(
            report,
            tmp_manifest,
            image_root=image_root,
            limit=limit,
            examples_per_shard=examples_per_shard,
            tfds_options=tfds_options,
        )
        records.replace_dataset(output_prefix, tmp_shards, tmp_manifest)
    except BaseException:
        records.remove_files([*tmp_shards, *([tmp_manifest] if tmp_manifest else [])])
        raise
    report.manifest = output_prefix + records.MANIFEST_SUFFIX
    return report


def _write_manifest(report: PrepareReport, path: str, **settings: Any) -> None:
    """Write the manifest to `path` (a temporary name beside the final `{prefix}.manifest.json`; local or
    remote, `owl_jax.paths`)."""
    folder = as_path(path).parent
    manifest = {
        "format": report.format,
        "inputs": report.inputs,
        "settings": {k: v for k, v in settings.items() if v},
        "num_examples": report.written,
        "tasks": report.tasks,
        "num_skipped": report.num_skipped,
        "skipped": report.skipped,
        "skipped_examples": report.skipped_examples,
        # Relative, so a dataset folder can be moved or copied elsewhere as a whole.
        "shards": [_relative(p, folder) for p in report.shards],
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    # A file name that is not UTF-8 (kept by Python as lone surrogates) is written as a JSON escape.
    as_path(path).write_bytes(text.encode("utf-8", "backslashreplace"))


def _relative(path: str, folder: epath.Path) -> str:
    """`path` relative to `folder` (a remote path: its part under `folder`, which holds it)."""
    if is_remote(path):
        return str(as_path(path).relative_to(folder))
    return os.path.relpath(os.path.abspath(path), folder)


if __name__ == "__main__":  # the same command as `owl-prepare`
    from owl_jax.cli.prepare import main

    sys.exit(main())
