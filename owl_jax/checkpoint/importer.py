"""Streaming import: checkpoint files → Flax leaves, one tensor at a time, with every key accounted for.

1. Read every file's key → (shape, dtype) table (no tensor data).
2. Compare with the expected keys: missing, unexpected and mis-shaped keys stop the run with one error
   naming them all.
3. Stream: each tensor is read, converted to the Flax layout and written into its leaf buffer; a leaf
   whose slices are all present is handed to `finalize` at once (e.g. placed on its mesh shards), so host
   memory holds at most the leaves still being filled.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from owl_jax.checkpoint.layout import KeyTarget, Path
from owl_jax.progress import progress_bar
from owl_jax.checkpoint.tensor_files import NUMPY_DTYPES, CheckpointError, open_tensor_file

_MAX_LISTED = 12


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the model the config describes."""


@dataclasses.dataclass
class KeyInventory:
    """What a set of weight files holds: key → (shape, dtype, file)."""

    entries: dict[str, tuple[tuple[int, ...], str, str]]

    renames: dict[str, str] = dataclasses.field(default_factory=dict)  # canonical key → key in its file

    @classmethod
    def scan(cls, paths: list[str], rename: Callable[[str], str | None] | None = None) -> "KeyInventory":
        """Read the key tables of `paths`; `rename` maps a file key to its canonical name (None: skip it)."""
        entries: dict[str, tuple[tuple[int, ...], str, str]] = {}
        renames: dict[str, str] = {}
        for path in paths:
            with open_tensor_file(path) as f:
                for key in f.keys():
                    shape, dtype = f.meta(key)
                    name = key if rename is None else rename(key)
                    if name is None:
                        continue
                    if name != key:
                        renames[name] = key
                    if name in entries:
                        raise CheckpointError(f"key {name!r} appears in both {entries[name][2]} and {path}")
                    entries[name] = (shape, dtype, path)
        return cls(entries, renames)

    def dtypes(self) -> collections.Counter:
        return collections.Counter(d for _, d, _ in self.entries.values())


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def check_keys(inventory: KeyInventory, targets: list[KeyTarget], *, ignore: Callable[[str], bool] = lambda k: False,
               source: str = "checkpoint", hint: str = "") -> None:
    """Raise `CheckpointMismatchError` naming every missing, unexpected and mis-shaped key."""
    expected = {t.hf_key: t for t in targets}
    missing = sorted(k for k in expected if k not in inventory.entries)
    unexpected = sorted(k for k in inventory.entries if k not in expected and not ignore(k))
    misshaped = [f"{k}: checkpoint {inventory.entries[k][0]} vs model {expected[k].hf_shape}"
                 for k in sorted(expected) if k in inventory.entries
                 and tuple(inventory.entries[k][0]) != tuple(expected[k].hf_shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches: {_listing(misshaped)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the model config ({len(targets)} keys expected, "
                                      f"{len(inventory.entries)} found):\n  " + "\n  ".join(problems)
                                      + (f"\n{hint}" if hint else ""))


def stream_leaves(inventory: KeyInventory, targets: list[KeyTarget],
                  leaf_specs: dict[Path, tuple[tuple[int, ...], Any]],
                  finalize: Callable[[Path, np.ndarray], Any], *, dtype: str | None = None,
                  desc: str = "import", show_progress: bool = True) -> dict[Path, Any]:
    """Read the targets' tensors file by file and build their leaves.

    Args:
      leaf_specs: `{path: (shape, dtype or None)}` of each leaf to build; dtype None keeps the file's.
      finalize: called with each completed leaf; its return value is what this function returns for it.
      dtype: cast every floating tensor to this dtype (overrides `leaf_specs`).

    Returns:
      `{path: finalize(path, leaf)}` for every leaf the targets fill.
    """
    by_key = {t.hf_key: t for t in targets}
    remaining = collections.Counter(t.path for t in targets)
    buffers: dict[Path, np.ndarray] = {}
    done: dict[Path, Any] = {}
    files: dict[str, list[str]] = collections.defaultdict(list)
    for key in by_key:
        files[inventory.entries[key][2]].append(key)
    total = sum(int(np.prod(inventory.entries[k][0], dtype=np.int64)) * NUMPY_DTYPES[inventory.entries[k][1]].itemsize
                for k in by_key)
    with progress_bar(total, desc, len(by_key), enabled=show_progress) as bar:
        for path in dict.fromkeys(inventory.entries[k][2] for k in by_key):
            with open_tensor_file(path) as f:
                wanted = {inventory.renames.get(k, k): k for k in files[path]}
                for file_key in f.keys():
                    key = wanted.get(file_key)
                    if key is None:
                        continue
                    target = by_key[key]
                    hf = f.get(file_key)
                    leaf = buffers.get(target.path)
                    if leaf is None:
                        shape, leaf_dtype = leaf_specs[target.path]
                        chosen = dtype or leaf_dtype or hf.dtype
                        leaf = buffers[target.path] = np.empty(shape, NUMPY_DTYPES[str(np.dtype(chosen))])
                    target.write(leaf, hf)
                    del hf
                    f.release(file_key)
                    bar.advance(f.nbytes(file_key))
                    remaining[target.path] -= 1
                    if remaining[target.path] == 0:
                        done[target.path] = finalize(target.path, buffers.pop(target.path))
    return done


def to_devices(shardings: dict[Path, jax.sharding.Sharding] | None) -> Callable[[Path, np.ndarray], Any]:
    """A `finalize` that places each leaf on its shards (only the addressable shards are copied)."""

    def finalize(path: Path, leaf: np.ndarray) -> jax.Array:
        if shardings is None:
            return jax.device_put(leaf)
        sharding = shardings[path]
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return finalize


def keep_on_host(path: Path, leaf: np.ndarray) -> np.ndarray:
    return leaf
