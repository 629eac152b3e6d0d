"""Export: Flax leaves → the released HF layout (safetensors by default, `.bin` on request), sharded with an
index, and kept adapters → a peft adapter folder.

What the released code loads with `load_state_dict(strict=True)`: every key of `keys.owl_targets` plus the
regenerated `rotary_emb.inv_freq` buffers. Tensors are converted one at a time as they are written
(`tensor_writer.write_hf_tensors`): safetensors shards hold no more than the parameters themselves plus one
converted tensor; a `.bin` shard is built whole by `torch.save`, so keep its `max_shard_bytes` moderate.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from owl_jax.checkpoint.folders import atomic_folder, copy_side_files, open_output
from owl_jax.checkpoint.keys import KeyTarget, owl_targets, rotary_buffers
from owl_jax.checkpoint.leaves import Path
from owl_jax.checkpoint.load import load_checkpoint
from owl_jax.checkpoint.lora import PEFT_PREFIX
from owl_jax.checkpoint.tensor_files import NUMPY_DTYPES, dtype_name
from owl_jax.checkpoint.tensor_writer import Tensor, write_hf_tensors
from owl_jax.config import LoRAConfig, OwlConfig


def _leaf_tensor(target: KeyTarget, leaf: Any, dtype: str | None) -> Tensor:
    out_dtype = dtype or dtype_name(np.dtype(leaf.dtype))

    def produce() -> np.ndarray:
        # Slice before moving to the host, so a device leaf is copied one layer at a time.
        piece = np.asarray(leaf if target.layer is None else leaf[target.layer])
        return target.to_hf(piece).astype(NUMPY_DTYPES[out_dtype], copy=False)

    return target.hf_key, tuple(target.hf_shape), out_dtype, produce


def export_hf(
    out_dir: str,
    cfg: OwlConfig,
    base_targets: list[KeyTarget],
    leaves: dict[Path, Any],
    *,
    hf_config: dict[str, Any],
    fmt: str = "safetensors",
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
    with_rotary_buffers: bool = True,
    lora_targets: list[KeyTarget] | None = None,
    lora: LoRAConfig | None = None,
    side_files_from: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> str:
    """Write the released HF layout (and, with `lora_targets`, a peft adapter in `OUT_DIR/adapter`).

    Args:
      base_targets: the keys to write (`keys.owl_targets(..., include_lora=False, include_copies=True)`).
      leaves: `{path: array}` host or device arrays.
      dtype: output dtype for all tensors; None keeps each leaf's dtype.
      max_shard_bytes: largest shard (default 5 GB for safetensors, 1 GB for `.bin`, which is built in memory).
      with_rotary_buffers: add `rotary_emb.inv_freq` buffers (the released code loads with strict=True).
    """
    tensors = [_leaf_tensor(t, leaves[t.path], dtype) for t in base_targets]
    if with_rotary_buffers:
        buffer_dtype = dtype or tensors[-1][2]
        for key, inv in rotary_buffers(cfg.text):
            tensors.append((key, inv.shape, buffer_dtype, lambda inv=inv, d=buffer_dtype: inv.astype(NUMPY_DTYPES[d])))
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        with open_output(os.path.join(tmp, "config.json")) as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        copy_side_files(side_files_from, tmp)
        write_hf_tensors(tmp, tensors, fmt=fmt, max_shard_bytes=max_shard_bytes, show_progress=show_progress)
        if lora_targets:
            assert lora is not None
            adapter_dir = os.path.join(tmp, "adapter")
            os.makedirs(adapter_dir)
            write_peft_adapter(
                adapter_dir, lora, lora_targets, leaves, fmt=fmt, dtype=dtype, show_progress=show_progress
            )
    return os.path.abspath(out_dir)


def write_peft_adapter(
    folder: str,
    lora: LoRAConfig,
    lora_targets: list[KeyTarget],
    leaves: dict[Path, Any],
    *,
    fmt: str = "safetensors",
    dtype: str | None = None,
    base_model: str = "",
    show_progress: bool = True,
) -> None:
    """A peft adapter folder: `adapter_config.json` + `adapter_model.{safetensors,bin}`."""
    config = dict(lora.to_peft_dict(), base_model_name_or_path=base_model)
    with open_output(os.path.join(folder, "adapter_config.json")) as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = []
    for t in lora_targets:
        key, shape, out_dtype, produce = _leaf_tensor(t, leaves[t.path], dtype)
        tensors.append((PEFT_PREFIX + key, shape, out_dtype, produce))
    write_hf_tensors(
        folder,
        tensors,
        fmt=fmt,
        max_shard_bytes=2**62,
        basename="adapter_model",
        show_progress=show_progress,
        desc="adapter",
    )


def export_checkpoint(
    ckpt_dir: str,
    out_dir: str,
    *,
    fmt: str = "safetensors",
    dtype: str | None = None,
    merge_lora: bool = False,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> str:
    """Converted (or HF) folder → HF layout loadable by the released code; adapters go to `OUT_DIR/adapter`.

    Args:
      fmt: "safetensors" or "bin".
      dtype: output dtype of every tensor; None keeps the stored ones.
      merge_lora: fold stored adapters into the kernels instead of writing `OUT_DIR/adapter`.
      max_shard_bytes: largest shard (default 5 GB safetensors, 1 GB `.bin`).

    Returns:
      The output folder's path (written atomically).
    """
    loaded = load_checkpoint(ckpt_dir, merge_lora=merge_lora, on_host=True, show_progress=show_progress)
    cfg = loaded.config
    shapes = {p: (tuple(v.shape), v.dtype) for p, v in loaded.leaves.items()}
    base_targets = owl_targets(cfg, shapes, include_lora=False, include_copies=True)  # a tied head twice
    lora_targets = owl_targets(cfg, shapes, include_base=False) if cfg.lora is not None else None
    return export_hf(
        out_dir,
        cfg,
        base_targets,
        loaded.leaves,
        hf_config=loaded.hf_config,
        fmt=fmt,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        with_rotary_buffers=loaded.rotary_buffers,
        lora_targets=lora_targets,
        lora=cfg.lora,
        side_files_from=loaded.source_dir,
        overwrite=overwrite,
        show_progress=show_progress,
    )
