"""The training record: one conversation with its encoded images, as stored in ArrayRecord shards.

Every source format (released JSONL, LLaVA, Alpaca, ShareGPT, captions, webdataset, TFDS) is turned into
`Example`s by `owl_jax.data.prepare`, and training reads only these. A record is

    [4-byte little-endian header length][UTF-8 JSON header][image 0 bytes][image 1 bytes]...

where the header holds the conversation and each image's byte length. Images stay in their original
encoding (JPEG/PNG) and are decoded (and checked) when training reads them.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator, Sequence

TASKS = ("caption", "multimodal", "text")
SHARD_SUFFIX = ".array_record"
MANIFEST_SUFFIX = ".manifest.json"
# Infixes of the files of a dataset being written, and of the files it replaces while it is moved in place.
_TMP, _OLD = ".tmp-", ".old-"
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})" + re.escape(SHARD_SUFFIX) + "$")


class RecordError(ValueError):
    """A record that cannot be decoded or does not describe a usable example."""


@dataclasses.dataclass
class Example:
    """One training example.

    Attributes:
      turns: `(human, ai)` pairs in order; the AI side is what the loss trains on. A caption is one turn with
        an empty human side.
      images: encoded image files, in the order their `Human: <image>` lines appear (all at the start).
      task: "caption" (stage 1), "multimodal" or "text" (stage 2 mixture halves).
    """

    turns: list[tuple[str, str]]
    images: list[bytes] = dataclasses.field(default_factory=list)
    task: str = "multimodal"
    id: str = ""
    source: str = ""

    def validate(self) -> Example:
        if self.task not in TASKS:
            raise RecordError(f"example {self.id!r}: task {self.task!r} is not one of {TASKS}")
        if not self.turns:
            raise RecordError(f"example {self.id!r}: empty conversation")
        for i, turn in enumerate(self.turns):
            if len(turn) != 2 or not all(isinstance(t, str) for t in turn):
                raise RecordError(f"example {self.id!r}: turn {i} is not a (human, ai) pair of strings")
            if not turn[1].strip():
                raise RecordError(f"example {self.id!r}: turn {i} has an empty answer")
        texts = [(f"turn {i}", text) for i, turn in enumerate(self.turns) for text in turn]
        for where, text in [("id", self.id), ("source", self.source), *texts]:
            problem = _unicode_problem(text)
            if problem:
                raise RecordError(f"example {self.id!r}: {where} {problem}")
        if self.task == "text" and self.images:
            raise RecordError(f"example {self.id!r}: a text-only example carries {len(self.images)} images")
        if self.task != "text" and not self.images:
            raise RecordError(f"example {self.id!r}: a {self.task} example has no image")
        return self

    def to_bytes(self) -> bytes:
        header = {
            "id": self.id,
            "source": self.source,
            "task": self.task,
            "turns": [list(t) for t in self.turns],
            "image_sizes": [len(b) for b in self.images],
        }
        blob = json.dumps(header, ensure_ascii=False).encode("utf-8")
        return struct.pack("<I", len(blob)) + blob + b"".join(self.images)

    @classmethod
    def from_bytes(cls, data: bytes) -> Example:
        try:
            (n,) = struct.unpack_from("<I", data, 0)
            header = json.loads(data[4 : 4 + n].decode("utf-8"))
            images, offset = [], 4 + n
            for size in header["image_sizes"]:
                images.append(bytes(data[offset : offset + size]))
                offset += size
            if offset != len(data):
                raise RecordError(f"record has {len(data) - offset} trailing bytes")
            return cls(
                turns=[tuple(t) for t in header["turns"]],
                images=images,
                task=header["task"],
                id=header.get("id", ""),
                source=header.get("source", ""),
            )
        except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise RecordError(f"undecodable record ({type(e).__name__}: {e})") from None


def _unicode_problem(text: object) -> str | None:
    """Why `text` cannot be stored as UTF-8 (JSON allows lone surrogates such as "\\ud800"), or None."""
    if not isinstance(text, str):
        return f"is a {type(text).__name__}, not text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text (a lone surrogate {text[e.start]!r} at character {e.start})"
    return None


def shard_paths(prefix: str, num_shards: int) -> list[str]:
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}{SHARD_SUFFIX}" for i in range(num_shards)]


def temporary_path(prefix: str, name: str) -> str:
    """Where a file of a dataset being written lives until the whole dataset is complete.

    These names never look like a dataset's (`find_shards` does not match them).
    """
    return f"{prefix}{_TMP}{name}"


def write_temporary_shards(examples: Iterable[Example], prefix: str, *, examples_per_shard: int = 10_000) -> list[str]:
    """Write serialized examples to ArrayRecord shards under temporary names; `replace_dataset` moves them
    in place. On any failure (Ctrl-C included) the temporary shards are removed before the error propagates."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp_paths: list[str] = []
    writer = None
    count = 0
    try:
        for example in examples:
            if writer is None or count % examples_per_shard == 0:
                if writer is not None:
                    writer.close()
                tmp_paths.append(temporary_path(prefix, f"{len(tmp_paths):05d}{SHARD_SUFFIX}"))
                writer = ArrayRecordWriter(tmp_paths[-1], "group_size:1")
            writer.write(example.to_bytes())
            count += 1
        if writer is not None:
            writer.close()
            writer = None
    except BaseException:
        if writer is not None:
            writer.close()
        remove_files(tmp_paths)
        raise
    return tmp_paths


def write_shards(examples: Iterable[Example], prefix: str, *, examples_per_shard: int = 10_000) -> list[str]:
    """Write serialized examples to ArrayRecord shards `prefix-0000i-of-0000n.array_record`.

    Shards are written under temporary names and replace any earlier shards under `prefix` once all are
    complete.
    """
    return replace_dataset(prefix, write_temporary_shards(examples, prefix, examples_per_shard=examples_per_shard))


def dataset_files(prefix: str) -> list[str]:
    """The shards (of any count) and the manifest of the dataset under `prefix`; not those of other prefixes."""
    folder, stem = os.path.split(os.path.abspath(prefix))
    names = os.listdir(folder) if os.path.isdir(folder) else []
    found = [
        os.path.join(os.path.dirname(prefix), n)
        for n in names
        if ((m := _SHARD_NAME.match(n)) and m["stem"] == stem) or n == stem + MANIFEST_SUFFIX
    ]
    return sorted(found)


def temporary_files(prefix: str) -> list[str]:
    """The temporary shards and manifest a run under `prefix` that was killed left behind."""
    return sorted(glob.glob(glob.escape(prefix) + _TMP + "*"))


def remove_files(paths: Iterable[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def replace_dataset(prefix: str, tmp_shards: Sequence[str], tmp_manifest: str | None = None) -> list[str]:
    """Move complete temporary shards (and manifest) in place of whatever dataset `prefix` held.

    The old files are first renamed aside (`{prefix}.old-*`), so the folder never holds a mix of two runs that
    looks complete, and are put back if a rename fails; they are deleted once the new dataset is in place.

    Returns:
      The final shard paths.
    """
    final = shard_paths(prefix, len(tmp_shards))
    moves = list(zip(tmp_shards, final))
    if tmp_manifest is not None:
        moves.append((tmp_manifest, prefix + MANIFEST_SUFFIX))
    aside = [(path, f"{prefix}{_OLD}{os.path.basename(path)}") for path in dataset_files(prefix)]
    done: list[tuple[str, str]] = []
    try:
        for path, old in aside:
            os.replace(path, old)
            done.append((path, old))
        for tmp, path in moves:
            os.replace(tmp, path)
            done.append((tmp, path))
    except BaseException:
        for src, dst in reversed(done):  # undo: new files back to their temporary names, old ones back in place
            os.replace(dst, src)
        raise
    remove_files(old for _, old in aside)
    return final


def find_shards(path_or_prefix: str) -> list[str]:
    """The shards of a prepared dataset, given its prefix, one shard, or a folder holding one dataset.

    Raises if a shard of the set is missing, so a half-copied dataset is not silently used.
    """
    if path_or_prefix.endswith(SHARD_SUFFIX) and os.path.isfile(path_or_prefix):
        return [path_or_prefix]
    if os.path.isdir(path_or_prefix):
        folder, stem = path_or_prefix, None
    else:
        folder, stem = os.path.split(os.path.abspath(path_or_prefix))
    matches = (
        [
            m
            for m in map(_SHARD_NAME.match, sorted(os.listdir(folder or ".")))
            if m and (stem is None or m["stem"] == stem)
        ]
        if os.path.isdir(folder or ".")
        else []
    )
    if not matches:
        raise FileNotFoundError(
            f"no {SHARD_SUFFIX} shards at {path_or_prefix}; run `python -m owl_jax.data.prepare` first"
        )
    stems = {m["stem"] for m in matches}
    if len(stems) > 1:
        raise ValueError(f"{path_or_prefix} holds several datasets ({sorted(stems)}); pass one prefix")
    total = int(matches[0]["n"])
    present = {int(m["i"]) for m in matches if int(m["n"]) == total}
    if present != set(range(total)) or len(matches) != total:
        raise FileNotFoundError(
            f"{path_or_prefix}: dataset is incomplete, shards {sorted(set(range(total)) - present)} "
            f"of {total} are missing"
        )
    return [os.path.join(folder, m.group(0)) for m in matches]


def read_examples(paths: Sequence[str]) -> Iterator[Example]:
    """All examples of the shards, in order (for inspection and tests; training uses grain)."""
    from array_record.python.array_record_module import ArrayRecordReader

    for path in paths:
        reader = ArrayRecordReader(path)
        try:
            for i in range(reader.num_records()):
                yield Example.from_bytes(reader.read([i])[0])
        finally:
            reader.close()
