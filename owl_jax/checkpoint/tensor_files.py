"""The tensor-file formats: PyTorch `.bin` (zip pickles) and safetensors, read and written one tensor at a time.

Reading:
- `.bin` files are opened with `torch.load(weights_only=True, mmap=True)`: only tensors and plain
  containers are unpickled (a pickle that would run code is refused), and tensor data stays on disk until
  read. After a tensor has been consumed its pages are dropped from this process (`madvise`), so reading
  a 14 GB file does not keep 14 GB resident.
- safetensors files are opened with `safetensors.safe_open(framework="numpy")`.
- bfloat16 arrives as `ml_dtypes.bfloat16` numpy arrays (numpy has no bfloat16 of its own).

Writing (`write_hf_tensors`): one file, or consecutive shards plus an HF index
(`model.safetensors.index.json` / `pytorch_model.bin.index.json`). Each tensor comes from a producer
called only when that tensor is written. safetensors shards are streamed one tensor at a time (the header
is computed first from shapes and dtypes); a `.bin` shard goes through `torch.save`, which needs the
whole shard in memory, so keep its `max_shard_bytes` moderate.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import struct
from typing import Any, Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from owl_jax.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from owl_jax.progress import progress_bar

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

NUMPY_DTYPES = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64), "int64": np.dtype(np.int64), "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
# safetensors shards are streamed (no memory cost); a `.bin` shard is built whole by torch.save.
DEFAULT_MAX_SHARD_BYTES = {"safetensors": 5 * 10 ** 9, "bin": 10 ** 9}

# (key, shape, dtype name) of a tensor to write, and with its producer.
Entry = tuple[str, tuple[int, ...], str]
Tensor = tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]


def dtype_name(dtype: Any) -> str:
    """Canonical name of a numpy / ml_dtypes / torch / safetensors dtype ("bfloat16", "float32", ...)."""
    text = str(dtype).replace("torch.", "")
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
            "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}.get(text, text)


class TensorFile:
    """One weight file: its keys, each key's shape and dtype, and the tensors one at a time."""

    def __init__(self, path: str):
        self.path = path
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def keys(self) -> list[str]:
        return list(self._meta)

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        """`(shape, dtype name)` without reading the data."""
        return self._meta[key]

    def nbytes(self, key: str) -> int:
        shape, dtype = self._meta[key]
        return int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPES[dtype].itemsize

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def release(self, key: str) -> None:
        """Let go of the memory behind `key` once its data has been copied elsewhere."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SafetensorsFile(TensorFile):
    def __init__(self, path: str):
        super().__init__(path)
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    self._meta[key] = (tuple(int(s) for s in sl.get_shape()), dtype_name(sl.get_dtype()))
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"cannot read safetensors file {path}: {e} (truncated or corrupt? "
                                  f"re-download it)") from None
        self._check_size()

    def _check_size(self) -> None:
        # A file cut short keeps a valid header; its data section is then smaller than the header claims.
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        actual = os.path.getsize(self.path) - 8 - header_len
        if actual < end:
            raise CheckpointError(f"safetensors file {self.path} is truncated: its header describes {end} bytes "
                                  f"of tensors but only {actual} are present; re-download or re-export it")

    def get(self, key: str) -> np.ndarray:
        # A fresh handle per tensor: the file's mapped pages leave this process when the handle closes,
        # so streaming a large file keeps only the current tensor resident.
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="numpy") as handle:
                return handle.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.path}: {e}") from None


class TorchBinFile(TensorFile):
    def __init__(self, path: str):
        super().__init__(path)
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch (pip install "
                                  f"'owl_jax[torch]'), or convert the folder to safetensors first") from None
        self._torch = torch
        self._state = self._load(path)
        if not isinstance(self._state, dict):
            raise CheckpointError(f"{path} holds a {type(self._state).__name__}, not a state dict of tensors")
        for key, t in self._state.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
            self._meta[key] = (tuple(t.shape), dtype_name(t.dtype))

    def _load(self, path: str) -> Any:
        torch = self._torch
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it contains objects other than tensors, and unpickling them could "
                f"run code ({str(e).splitlines()[0]}). Only load checkpoints you trust; a plain state dict "
                f"of tensors loads fine.") from None
        except RuntimeError as e:
            if "mmap" in str(e) and "zip" in str(e):  # legacy (pre-1.6) non-zip format cannot be mapped
                try:
                    return torch.load(path, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as e2:
                    raise UnsafeCheckpointError(f"refusing to load {path}: {str(e2).splitlines()[0]}") from None
            raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]} (truncated or corrupt? "
                                  f"re-download it)") from None
        except (EOFError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e} (truncated or corrupt? re-download it)") from None

    def get(self, key: str) -> np.ndarray:
        torch = self._torch
        t = self._state[key]
        try:
            if t.dtype == torch.bfloat16:
                return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return t.contiguous().numpy()
        except RuntimeError as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.path}: {e}") from None

    def release(self, key: str) -> None:
        t = self._state.get(key)  # kept: a tensor read again faults its pages back in
        if t is not None:
            _drop_pages(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())

    def close(self) -> None:
        self._state = {}


def _drop_pages(address: int, nbytes: int) -> None:
    """Drop the (clean, file-backed) pages of a mapped range from this process; best effort."""
    if nbytes < mmap.PAGESIZE or address == 0:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    start = (address + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start and hasattr(libc, "madvise"):
        MADV_DONTNEED = 4
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


def open_tensor_file(path: str) -> TensorFile:
    if not os.path.isfile(path):
        raise CheckpointError(f"weight file {path} does not exist")
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    return TorchBinFile(path)


def weight_files(folder: str, *, single: tuple[str, ...] = (SAFE_SINGLE, BIN_SINGLE),
                 index: tuple[str, ...] = (SAFE_INDEX, BIN_INDEX)) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of an HF folder, in order, and the index's key → file map when sharded.

    safetensors is preferred over `.bin` when both are present.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder")
    for single_name, index_name in zip(single, index):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path} is not a valid shard index ({e})") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise CheckpointError(f"{index_path} lists shard files that are missing: {missing}")
            return [os.path.join(folder, f) for f in files], weight_map
        single_path = os.path.join(folder, single_name)
        if os.path.isfile(single_path):
            return [single_path], None
    present = sorted(os.listdir(folder))[:20]
    raise CheckpointError(f"no weights in {folder}: expected one of {list(single) + list(index)}; found {present}")


# ------------------------------------------------------------------------------------------------
# Writing.

def parse_size(text: str | int) -> int:
    """"5GB" / "500MB" / "1GiB" / 1234 → bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
             "GIB": 2 ** 30}
    s = text.strip().upper()
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
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


def write_safetensors(path: str, entries: list[Entry], arrays: Iterable[np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Stream `arrays` (in `entries` order) into a safetensors file without holding them together."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, shape, dtype in entries:
        n = _nbytes(shape, dtype)
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
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
    torch.save(state, path)


def _check_planned(key: str, shape: tuple[int, ...], dtype: str, array: np.ndarray) -> None:
    if tuple(array.shape) != tuple(shape) or dtype_name(array.dtype) != dtype:
        raise ValueError(f"{key}: planned {tuple(shape)} {dtype}, got {array.shape} {array.dtype}")


def write_hf_tensors(folder: str, tensors: list[Tensor], *, fmt: str = "safetensors",
                     max_shard_bytes: int | None = None, basename: str | None = None,
                     show_progress: bool = True, desc: str = "export") -> list[str]:
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
    names = [f"{stem}{ext}"] if len(shards) == 1 else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}{ext}"
                                                       for i in range(len(shards))]
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
        index = {"metadata": {"total_size": total},
                 "weight_map": {entries[i][0]: name for name, shard in zip(names, shards) for i in shard}}
        with open(os.path.join(folder, f"{stem}{ext}.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names
