"""Flax leaves → the released HF layout (safetensors by default, `.bin` on request), sharded with an index.

safetensors shards are written one tensor at a time (the header is computed first from shapes and
dtypes), so exporting holds no more than the parameters themselves plus one converted tensor. `.bin`
shards go through `torch.save`, which needs a whole shard in memory: keep `max_shard_bytes` moderate.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterable, Iterator

import numpy as np

from owl_jax.checkpoint.layout import KeyTarget, Path, rotary_buffers
from owl_jax.checkpoint.native import atomic_folder, copy_side_files
from owl_jax.checkpoint.tensor_files import NUMPY_DTYPES, dtype_name
from owl_jax.config import LoRAConfig, OwlConfig
from owl_jax.progress import progress_bar

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
# safetensors shards are streamed (no memory cost); a `.bin` shard is built whole by torch.save.
DEFAULT_MAX_SHARD_BYTES = {"safetensors": 5 * 10 ** 9, "bin": 10 ** 9}


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


def plan_shards(entries: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int) -> list[list[int]]:
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


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], str]], arrays: Iterable[np.ndarray],
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
            array = np.ascontiguousarray(array)
            if tuple(array.shape) != tuple(shape) or dtype_name(array.dtype) != dtype:
                raise ValueError(f"{key}: planned {shape} {dtype}, got {array.shape} {array.dtype}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))


def write_torch_bin(path: str, entries: list[tuple[str, tuple[int, ...], str]], arrays: Iterable[np.ndarray]) -> None:
    import torch

    state = {}
    for (key, _, _), array in zip(entries, arrays):
        array = np.ascontiguousarray(array)
        if dtype_name(array.dtype) == "bfloat16":
            state[key] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            state[key] = torch.from_numpy(array)
    torch.save(state, path)


def write_hf_tensors(folder: str, tensors: list[tuple[str, tuple[int, ...], str, Any]], *, fmt: str = "safetensors",
                     max_shard_bytes: int | None = None, basename: str | None = None,
                     show_progress: bool = True, desc: str = "export") -> list[str]:
    """Write `(key, shape, dtype, producer)` tensors as one file or shards + index; returns the file names.

    `producer()` returns the array; it is called only when that tensor is written.
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"unknown format {fmt!r}; use safetensors or bin")
    entries = [(k, s, d) for k, s, d, _ in tensors]
    shards = plan_shards(entries, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES[fmt])
    stem, ext = (basename or ("model" if fmt == "safetensors" else "pytorch_model")), (
        ".safetensors" if fmt == "safetensors" else ".bin")
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
            if fmt == "safetensors":
                write_safetensors(os.path.join(folder, name), shard_entries, produce())
            else:
                write_torch_bin(os.path.join(folder, name), shard_entries, produce())
    if len(names) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {entries[i][0]: name for name, shard in zip(names, shards) for i in shard}}
        index_name = f"{stem}{ext}.index.json"
        with open(os.path.join(folder, index_name), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names


def _leaf_tensor(target: KeyTarget, leaf: Any, dtype: str | None) -> tuple[str, tuple[int, ...], str, Any]:
    out_dtype = dtype or dtype_name(np.dtype(leaf.dtype))

    def produce() -> np.ndarray:
        # Slice before moving to the host, so a device leaf is copied one layer at a time.
        piece = np.asarray(leaf if target.layer is None else leaf[target.layer])
        return target.to_hf(piece).astype(NUMPY_DTYPES[out_dtype], copy=False)

    return target.hf_key, tuple(target.hf_shape), out_dtype, produce


def export_hf(out_dir: str, cfg: OwlConfig, base_targets: list[KeyTarget], leaves: dict[Path, Any], *,
              hf_config: dict[str, Any], fmt: str = "safetensors", dtype: str | None = None,
              max_shard_bytes: int | None = None, with_rotary_buffers: bool = True,
              lora_targets: list[KeyTarget] | None = None, lora: LoRAConfig | None = None,
              side_files_from: str | None = None, overwrite: bool = False, show_progress: bool = True) -> str:
    """Write the released HF layout (and, with `lora_targets`, a peft adapter in `OUT_DIR/adapter`).

    Args:
      base_targets: the keys to write (`layout.owl_targets(..., include_lora=False)`).
      leaves: `{path: array}` host or device arrays.
      dtype: output dtype for all tensors; None keeps each leaf's dtype.
      max_shard_bytes: largest shard (default 5 GB for safetensors, 1 GB for `.bin`, which is built in memory).
      with_rotary_buffers: add `rotary_emb.inv_freq` buffers (the released code loads with strict=True).
    """
    tensors = [_leaf_tensor(t, leaves[t.path], dtype) for t in base_targets]
    if with_rotary_buffers:
        buffer_dtype = dtype or tensors[-1][2]
        for key, inv in rotary_buffers(cfg):
            tensors.append((key, inv.shape, buffer_dtype,
                            lambda inv=inv, d=buffer_dtype: inv.astype(NUMPY_DTYPES[d])))
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        copy_side_files(side_files_from, tmp)
        write_hf_tensors(tmp, tensors, fmt=fmt, max_shard_bytes=max_shard_bytes, show_progress=show_progress)
        if lora_targets:
            assert lora is not None
            adapter_dir = os.path.join(tmp, "adapter")
            os.makedirs(adapter_dir)
            write_peft_adapter(adapter_dir, lora, lora_targets, leaves, fmt=fmt, dtype=dtype,
                               show_progress=show_progress)
    return os.path.abspath(out_dir)


def write_peft_adapter(folder: str, lora: LoRAConfig, lora_targets: list[KeyTarget], leaves: dict[Path, Any], *,
                       fmt: str = "safetensors", dtype: str | None = None, base_model: str = "",
                       show_progress: bool = True) -> None:
    """A peft adapter folder: `adapter_config.json` + `adapter_model.{safetensors,bin}`."""
    from owl_jax.checkpoint.lora import PEFT_PREFIX

    config = dict(lora.to_peft_dict(), base_model_name_or_path=base_model)
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = []
    for t in lora_targets:
        key, shape, out_dtype, produce = _leaf_tensor(t, leaves[t.path], dtype)
        tensors.append((PEFT_PREFIX + key, shape, out_dtype, produce))
    write_hf_tensors(folder, tensors, fmt=fmt, max_shard_bytes=2 ** 62, basename="adapter_model",
                     show_progress=show_progress, desc="adapter")
