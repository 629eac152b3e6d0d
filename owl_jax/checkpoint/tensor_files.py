"""The tensor-file formats: PyTorch `.bin` (zip pickles) and safetensors, read one tensor at a time.

- `.bin` files are opened with `torch.load(weights_only=True, mmap=True)`: only tensors and plain
  containers are unpickled (a pickle that would run code is refused), and tensor data stays on disk until
  read. After a tensor has been consumed its pages are dropped from this process (`madvise`), so reading
  a 14 GB file does not keep 14 GB resident.
- safetensors files are opened with `safetensors.safe_open(framework="numpy")`.
- bfloat16 arrives as `ml_dtypes.bfloat16` numpy arrays (numpy has no bfloat16 of its own).

`tensor_writer` writes both formats.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import warnings
from typing import Any

import ml_dtypes
import numpy as np

from owl_jax.checkpoint.errors import CheckpointError, UnsafeCheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

NUMPY_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


def dtype_name(dtype: Any) -> str:
    """Canonical name of a numpy / ml_dtypes / torch / safetensors dtype ("bfloat16", "float32", ...)."""
    text = str(dtype).replace("torch.", "")
    return {
        "BF16": "bfloat16",
        "F16": "float16",
        "F32": "float32",
        "F64": "float64",
        "I64": "int64",
        "I32": "int32",
        "I8": "int8",
        "U8": "uint8",
        "BOOL": "bool",
    }.get(text, text)


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

    def __enter__(self) -> TensorFile:
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
            raise CheckpointError(
                f"cannot read safetensors file {path}: {e} (truncated or corrupt? re-download it)"
            ) from None
        self._check_size()

    def _check_size(self) -> None:
        # A file cut short keeps a valid header; its data section is then smaller than the header claims.
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        actual = os.path.getsize(self.path) - 8 - header_len
        if actual < end:
            raise CheckpointError(
                f"safetensors file {self.path} is truncated: its header describes {end} bytes "
                f"of tensors but only {actual} are present; re-download or re-export it"
            )

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
            raise CheckpointError(
                f"{path} is a PyTorch pickle; reading it needs torch (pip install "
                f"'owl_jax[torch]'), or convert the folder to safetensors first"
            ) from None
        self._torch = torch
        self._state = self._load(path)
        if not isinstance(self._state, dict):
            raise CheckpointError(f"{path} holds a {type(self._state).__name__}, not a state dict of tensors")
        for key, t in self._state.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor")
            self._meta[key] = (tuple(t.shape), dtype_name(t.dtype))

    def _load(self, path: str) -> Any:
        # A damaged pickle also makes torch warn (unknown protocol, deprecated storages, ...) on top of the
        # error raised: the error alone is reported.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self._load_quietly(path)

    def _load_quietly(self, path: str) -> Any:
        torch = self._torch
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it contains objects other than tensors, and unpickling them could "
                f"run code ({_first_line(e)}). Only load checkpoints you trust; a plain state dict "
                f"of tensors loads fine."
            ) from None
        except RuntimeError as e:
            if "mmap" in str(e) and "zip" in str(e):  # legacy (pre-1.6) non-zip format cannot be mapped
                try:
                    return torch.load(path, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as e2:
                    raise UnsafeCheckpointError(f"refusing to load {path}: {_first_line(e2)}") from None
                except Exception as e2:  # whatever a damaged pickle makes the unpickler raise
                    raise CheckpointError(
                        f"cannot read {path}: {_first_line(e2)} (truncated or corrupt? re-download it)"
                    ) from None
            raise CheckpointError(
                f"cannot read {path}: {_first_line(e)} (truncated or corrupt? re-download it)"
            ) from None
        except Exception as e:  # EOFError, ValueError, KeyError, IndexError, ...: a damaged zip or pickle
            raise CheckpointError(
                f"cannot read {path}: {_first_line(e)} (truncated or corrupt? re-download it)"
            ) from None

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


def _first_line(e: BaseException) -> str:
    """The first line of `e`'s message, with its type when that says more than the message alone."""
    lines = str(e).splitlines()
    text = lines[0] if lines else ""
    if isinstance(e, (KeyError, IndexError, TypeError, AttributeError, EOFError)) or not text:
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text


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
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"weight file {path} is empty (0 bytes); re-download it")
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    return TorchBinFile(path)


def _read_weight_map(index_path: str) -> dict[str, str]:
    """An HF shard index's `weight_map`: tensor key → shard file name, each file inside the index's folder."""
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid shard index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: weight_map is a {type(weight_map).__name__}, not an object")
    for key, name in weight_map.items():
        # A shard is a file next to the index: a path that leads elsewhere would read another model's weights.
        if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] = {name!r} is not a file name in this folder")
    return weight_map


def weight_files(
    folder: str,
    *,
    single: tuple[str, ...] = (SAFE_SINGLE, BIN_SINGLE),
    index: tuple[str, ...] = (SAFE_INDEX, BIN_INDEX),
) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of an HF folder, in order, and the index's key → file map when sharded.

    safetensors is preferred over `.bin` when both are present.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder")
    for single_name, index_name in zip(single, index):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            weight_map = _read_weight_map(index_path)
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
