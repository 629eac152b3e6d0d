"""Streaming import: checkpoint files → Flax leaves, one leaf at a time, with every key accounted for.

1. Read every file's key → (shape, dtype) table (no tensor data): `KeyInventory.scan`.
2. Compare with the expected keys (`KeyTarget`s from `owl_jax.checkpoint.keys`): missing, unexpected and
   mis-shaped keys stop the run with one error naming them all (`check_keys`).
3. Read leaf by leaf (`LeafReader`): each of a leaf's tensors (one per layer for a stacked leaf, wherever
   it is in the files) is read, converted to the Flax layout and written into the leaf's buffer, and its
   file pages are let go at once. A finished leaf goes to its consumer before the next one is started (a
   `finalize` such as `to_devices`, or a writer), so host memory holds one leaf being filled, not the model.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from owl_jax.checkpoint.errors import CheckpointError, CheckpointMismatchError
from owl_jax.checkpoint.keys import KeyTarget
from owl_jax.checkpoint.leaves import Path, PendingLeaf, empty_aligned
from owl_jax.checkpoint.tensor_files import NUMPY_DTYPES, TensorFile, open_tensor_file
from owl_jax.progress import progress_bar

_MAX_LISTED = 12


@dataclasses.dataclass
class KeyInventory:
    """What a set of weight files holds: key → (shape, dtype, file)."""

    entries: dict[str, tuple[tuple[int, ...], str, str]]

    renames: dict[str, str] = dataclasses.field(default_factory=dict)  # canonical key → key in its file

    @classmethod
    def scan(cls, paths: list[str], rename: Callable[[str], str | None] | None = None) -> KeyInventory:
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

    def fold_copies(self, copies: dict[str, str]) -> KeyInventory:
        """Account for tensors saved twice (a tied head): for each `{key: copy}`, the copy is dropped when
        `key` is there too (their shapes must agree) and read as `key` when it is there alone. Returns self."""
        for key, copy in copies.items():
            if copy not in self.entries:
                continue
            if key in self.entries:
                if self.entries[key][0] != self.entries[copy][0]:
                    raise CheckpointMismatchError(
                        f"{copy} {self.entries[copy][0]} should be a copy of {key} {self.entries[key][0]} "
                        f"(tied embeddings) but their shapes differ"
                    )
                del self.entries[copy]
                self.renames.pop(copy, None)
            else:
                self.entries[key] = self.entries.pop(copy)
                self.renames[key] = self.renames.pop(copy, copy)
        return self

    def dtypes(self) -> collections.Counter:
        return collections.Counter(d for _, d, _ in self.entries.values())

    def nbytes(self, key: str) -> int:
        shape, dtype, _ = self.entries[key]
        return int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPES[dtype].itemsize


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def check_keys(
    inventory: KeyInventory,
    targets: list[KeyTarget],
    *,
    ignore: Callable[[str], bool] = lambda k: False,
    source: str = "checkpoint",
    hint: str = "",
) -> None:
    """Raise `CheckpointMismatchError` naming every missing, unexpected and mis-shaped key."""
    expected = {t.hf_key: t for t in targets}
    missing = sorted(k for k in expected if k not in inventory.entries)
    unexpected = sorted(k for k in inventory.entries if k not in expected and not ignore(k))
    misshaped = [
        f"{k}: checkpoint {inventory.entries[k][0]} vs model {expected[k].hf_shape}"
        for k in sorted(expected)
        if k in inventory.entries and tuple(inventory.entries[k][0]) != tuple(expected[k].hf_shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches: {_listing(misshaped)}")
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not match the model config ({len(targets)} keys expected, "
            f"{len(inventory.entries)} found):\n  " + "\n  ".join(problems) + (f"\n{hint}" if hint else "")
        )


class LeafReader:
    """The leaves that checked `targets` fill, each read whole on request (`read`, or `pending` for writers).

    Use as a context manager: the files stay open (mapped, not read) until it closes, and a progress bar
    over all the targets' bytes runs meanwhile.

    Args:
      leaf_specs: `{path: (shape, dtype or None)}` of each leaf to build; dtype None keeps the file's.
      dtype: cast every tensor to this dtype (overrides `leaf_specs`).
    """

    def __init__(
        self,
        inventory: KeyInventory,
        targets: list[KeyTarget],
        leaf_specs: dict[Path, tuple[tuple[int, ...], Any]],
        *,
        dtype: str | None = None,
        desc: str = "import",
        show_progress: bool = True,
    ):
        self.inventory = inventory
        self._by_leaf: dict[Path, list[KeyTarget]] = collections.defaultdict(list)
        for target in targets:
            self._by_leaf[target.path].append(target)
        self._specs = leaf_specs
        self._dtype = dtype
        self._files: dict[str, TensorFile] = {}
        total = sum(inventory.nbytes(t.hf_key) for t in targets)
        self._stack = contextlib.ExitStack()
        self._bar = self._stack.enter_context(progress_bar(total, desc, len(targets), enabled=show_progress))

    @property
    def paths(self) -> list[Path]:
        """The leaves, in the order their first tensors appear in `targets`."""
        return list(self._by_leaf)

    def spec(self, path: Path) -> tuple[tuple[int, ...], np.dtype]:
        """`(shape, dtype)` of the leaf at `path` as `read` returns it."""
        shape, leaf_dtype = self._specs[path]
        first = self._by_leaf[path][0].hf_key
        chosen = self._dtype or leaf_dtype or self.inventory.entries[first][1]
        return tuple(shape), NUMPY_DTYPES[str(np.dtype(chosen))]

    def read(self, path: Path) -> np.ndarray:
        """The leaf at `path`, filled from all its tensors (in a 64-byte aligned host buffer)."""
        leaf = empty_aligned(*self.spec(path))
        for target in self._by_leaf[path]:
            _, _, file = self.inventory.entries[target.hf_key]
            f = self._files.get(file)
            if f is None:
                f = self._files[file] = open_tensor_file(file)
            file_key = self.inventory.renames.get(target.hf_key, target.hf_key)
            hf = f.get(file_key)
            target.write(leaf, hf)
            del hf
            f.release(file_key)
            self._bar.advance(self.inventory.nbytes(target.hf_key))
        return leaf

    def pending(self, path: Path, then: Callable[[np.ndarray], np.ndarray] | None = None) -> PendingLeaf:
        """The leaf at `path` as a `PendingLeaf` (read when materialized; `then` post-processes it)."""
        shape, dtype = self.spec(path)
        produce = (lambda: self.read(path)) if then is None else (lambda: then(self.read(path)))
        return PendingLeaf(shape, dtype, produce)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        self._stack.close()

    def __enter__(self) -> LeafReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def stream_leaves(
    inventory: KeyInventory,
    targets: list[KeyTarget],
    leaf_specs: dict[Path, tuple[tuple[int, ...], Any]],
    finalize: Callable[[Path, np.ndarray], Any],
    *,
    dtype: str | None = None,
    desc: str = "import",
    show_progress: bool = True,
) -> dict[Path, Any]:
    """Read the targets' leaves one at a time, handing each to `finalize` as soon as it is complete.

    Args:
      leaf_specs: `{path: (shape, dtype or None)}` of each leaf to build; dtype None keeps the file's.
      finalize: called with each completed leaf; its return value is what this function returns for it.
      dtype: cast every tensor to this dtype (overrides `leaf_specs`).

    Returns:
      `{path: finalize(path, leaf)}` for every leaf the targets fill.
    """
    with LeafReader(inventory, targets, leaf_specs, dtype=dtype, desc=desc, show_progress=show_progress) as reader:
        return {path: finalize(path, reader.read(path)) for path in reader.paths}


def to_devices(shardings: dict[Path, jax.sharding.Sharding] | None) -> Callable[[Path, np.ndarray], Any]:
    """A `finalize` that places each leaf on its shards (only the addressable shards are copied).

    Without shardings the leaf goes to the first device; an aligned host leaf on a CPU is then used in
    place (no copy), so the caller must not modify it afterwards.
    """

    def finalize(path: Path, leaf: np.ndarray) -> jax.Array:
        if shardings is None:
            return jax.device_put(leaf)
        sharding = shardings[path]
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return finalize


def keep_on_host(path: Path, leaf: np.ndarray) -> np.ndarray:
    """A `finalize` that keeps the host array."""
    return leaf
