"""Writing tensor files: one file, or consecutive shards plus an HF index (`model.safetensors.index.json` /
`pytorch_model.bin.index.json`).

Each tensor comes from a producer called only when that tensor is written. safetensors shards are
streamed one tensor at a time (the header is computed first from shapes and dtypes); a `.bin` shard goes
through `torch.save`, which needs the whole shard in memory, so keep its `max_shard_bytes` moderate.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from owl_jax.checkpoint.folders import open_output
from owl_jax.checkpoint.tensor_files import NUMPY_DTYPES, dtype_name
from owl_jax.progress import progress_bar

SAFETENSORS_DTYPES = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
# safetensors shards are streamed (no memory cost); a `.bin` shard is built whole by torch.save.
DEFAULT_MAX_SHARD_BYTES = {"safetensors": 5 * 10**9, "bin": 10**9}

# (key, shape, dtype name) of a tensor to write, and with its producer.
Entry = tuple[str, tuple[int, ...], str]
Tensor = tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]


def parse_size(text: str | int) -> int:
    """ "5GB" / "500MB" / "1GiB" / 1234 → bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number) :]
    if unit not in units or not number:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or 2GiB")
    return int(float(number) * units[unit])


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPES[dtype].itemsize


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[int]]:
    """Group entry indices into consecutive shards of at most `max_shard_bytes` (a bigger tensor: alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(entries):
        n = _nbytes(shape, dtype)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return [s for s in shards if s]


def write_safetensors(
    path: str, entries: list[Entry], arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Stream `arrays` (in `entries` order) into a safetensors file without holding them together."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, shape, dtype in entries:
        n = _nbytes(shape, dtype)
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open_output(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (key, shape, dtype), array in zip(entries, arrays):
            _check_planned(key, shape, dtype, array)
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def write_torch_bin(path: str, entries: list[Entry], arrays: Iterable[np.ndarray]) -> None:
    """One `torch.save` state dict of `arrays` (in `entries` order); bfloat16 stays bfloat16."""
    import torch

    state = {}
    for (key, shape, dtype), array in zip(entries, arrays):
        _check_planned(key, shape, dtype, array)
        array = np.ascontiguousarray(array)
        if dtype_name(array.dtype) == "bfloat16":
            state[key] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            state[key] = torch.from_numpy(array)
    with open_output(path, "wb") as f:  # a Python file: a failed write keeps its OSError (errno) as the cause
        torch.save(state, f)


def _check_planned(key: str, shape: tuple[int, ...], dtype: str, array: np.ndarray) -> None:
    if tuple(array.shape) != tuple(shape) or dtype_name(array.dtype) != dtype:
        raise ValueError(f"{key}: planned {tuple(shape)} {dtype}, got {array.shape} {array.dtype}")


def write_hf_tensors(
    folder: str,
    tensors: list[Tensor],
    *,
    fmt: str = "safetensors",
    max_shard_bytes: int | None = None,
    basename: str | None = None,
    show_progress: bool = True,
    desc: str = "export",
) -> list[str]:
    """Write `(key, shape, dtype, producer)` tensors as one file or shards + index; returns the file names.

    Args:
      tensors: in file order; `producer()` returns the array (of that shape and dtype) and is called only
        when that tensor is written.
      fmt: "safetensors" or "bin".
      max_shard_bytes: largest shard (default 5 GB for safetensors, 1 GB for `.bin`); one file when all fit.
      basename: file stem (default `model` / `pytorch_model`, HF's names).
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"unknown format {fmt!r}; use safetensors or bin")
    entries = [(k, s, d) for k, s, d, _ in tensors]
    shards = plan_shards(entries, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES[fmt])
    stem = basename or ("model" if fmt == "safetensors" else "pytorch_model")
    ext = ".safetensors" if fmt == "safetensors" else ".bin"
    names = (
        [f"{stem}{ext}"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}" for i in range(len(shards))]
    )
    total = sum(_nbytes(s, d) for _, s, d in entries)
    with progress_bar(total, desc, len(entries), enabled=show_progress) as bar:
        for name, shard in zip(names, shards):

            def produce(indices: list[int] = shard) -> Iterator[np.ndarray]:
                for i in indices:
                    array = tensors[i][3]()
                    yield array
                    bar.advance(array.nbytes)

            shard_entries = [entries[i] for i in shard]
            write = write_safetensors if fmt == "safetensors" else write_torch_bin
            write(os.path.join(folder, name), shard_entries, produce())
    if len(names) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {entries[i][0]: name for name, shard in zip(names, shards) for i in shard},
        }
        with open_output(os.path.join(folder, f"{stem}{ext}.index.json")) as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names
