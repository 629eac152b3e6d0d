"""Loading any supported checkpoint folder, and the import/export conversions built on it.

Supported sources: an HF-layout folder of the released model (`config.json` + `.bin` or safetensors,
single or sharded) and a converted folder (`native.py`), each optionally with a LoRA adapter on top.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from owl_jax.checkpoint import native
from owl_jax.checkpoint.export import export_hf
from owl_jax.checkpoint.hf_import import abstract_model, flat_shardings, load_hf_leaves
from owl_jax.checkpoint.importer import KeyInventory, check_keys, keep_on_host, stream_leaves, to_devices
from owl_jax.checkpoint.layout import Path, leaf_shapes, owl_targets
from owl_jax.checkpoint.lora import LoRASource, locate_lora, merge_lora_params
from owl_jax.checkpoint.tensor_files import CheckpointError
from owl_jax.config import OwlConfig


@dataclasses.dataclass
class LoadedCheckpoint:
    config: OwlConfig  # the model the leaves fill (`lora` set when adapters are kept)
    leaves: dict[Path, Any]
    hf_config: dict[str, Any]  # the source's config.json, unchanged
    source_dir: str
    rotary_buffers: bool  # whether the source layout carries `rotary_emb.inv_freq` buffers


def _read_hf_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no config.json; expected an HF-layout mPLUG-Owl folder or a folder "
                              f"written by convert_weights.py")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _finalizer(cfg: OwlConfig, mesh: jax.sharding.Mesh | None, on_host: bool):
    if on_host:
        return keep_on_host
    shardings = flat_shardings(abstract_model(cfg)[1], mesh) if mesh is not None else None
    return to_devices(shardings)


def load_checkpoint(path: str, *, weights_dtype: str | None = None, lora: str | None = None, merge_lora: bool = False,
                    lora_alpha: float | None = None, mesh: jax.sharding.Mesh | None = None, on_host: bool = False,
                    show_progress: bool = True, runtime: dict[str, Any] | None = None) -> LoadedCheckpoint:
    """Read a checkpoint folder into Flax leaves.

    Args:
      path: HF-layout folder or converted folder.
      weights_dtype: parameter dtype; None keeps the stored dtypes.
      lora: a peft adapter folder or trainer checkpoint to apply; `merge_lora` folds it (or adapters stored in
        a converted folder) into the base kernels.
      mesh: place leaves on their shards of this mesh (default: the first device); `on_host` keeps numpy.
      runtime: run-time config fields (`dtype`, `param_dtype`, `scan_layers`, ...) for the returned config.
    """
    path = os.path.abspath(path)
    hf_config = _read_hf_config(path)
    base_cfg = OwlConfig.from_hf_config(hf_config, **(runtime or {}))
    lora_source = locate_lora(lora, lora_alpha=lora_alpha) if lora else None

    if not native.is_converted(path):
        final_cfg = base_cfg.replace(lora=lora_source.config if lora_source and not merge_lora else None)
        cfg, leaves = load_hf_leaves(path, base_cfg, dtype=weights_dtype, lora=lora_source, merge=merge_lora,
                                     finalize=_finalizer(final_cfg, mesh, on_host), show_progress=show_progress)
        return LoadedCheckpoint(cfg, leaves, hf_config, path, rotary_buffers=True)

    meta = native.read_meta(path)
    stored_lora = native.lora_config_of(meta)
    if stored_lora is not None and lora_source is not None:
        raise CheckpointError(f"{path} already holds LoRA adapters; merge them first (export --merge-lora or "
                              f"import --merge-lora) before applying another adapter")
    stored_cfg = base_cfg.replace(lora=stored_lora)
    shapes = leaf_shapes(abstract_model(stored_cfg)[1])
    needs_host = on_host or lora_source is not None or (merge_lora and stored_lora is not None)
    if not needs_host:
        shardings = flat_shardings(abstract_model(stored_cfg)[1], mesh) if mesh is not None else None
        leaves = native.load_converted_leaves(path, shapes, dtype=weights_dtype, shardings=shardings)
        return LoadedCheckpoint(stored_cfg, leaves, hf_config, path, meta.get("rotary_buffers", True))

    leaves = native.load_converted_leaves(path, shapes, on_host=True)
    cfg = stored_cfg
    if merge_lora and stored_lora is not None:
        leaves = merge_lora_params(leaves, stored_lora.scale)
        cfg = cfg.replace(lora=None)
    if lora_source is not None:
        leaves, cfg = _apply_adapter(leaves, cfg, lora_source, merge_lora, show_progress)
    if weights_dtype is not None:
        leaves = {p: v.astype(np.dtype(weights_dtype)) for p, v in leaves.items()}
    if not on_host:
        finalize = _finalizer(cfg, mesh, on_host=False)
        leaves = {p: finalize(p, v) for p, v in leaves.items()}
    return LoadedCheckpoint(cfg, leaves, hf_config, path, meta.get("rotary_buffers", True))


def _apply_adapter(leaves: dict[Path, np.ndarray], cfg: OwlConfig, source: LoRASource, merge: bool,
                   show_progress: bool) -> tuple[dict[Path, np.ndarray], OwlConfig]:
    with_lora = cfg.replace(lora=source.config)
    shapes = leaf_shapes(abstract_model(with_lora)[1])
    inventory = KeyInventory.scan(source.files, rename=LoRASource.canonical_key)
    targets = owl_targets(with_lora, shapes, include_base=False)
    check_keys(inventory, targets, source=f"LoRA adapter {source.files[0]}")
    adapter = stream_leaves(inventory, targets, {p: (s, None) for p, (s, _) in shapes.items()}, keep_on_host,
                            desc="adapter", show_progress=show_progress)
    combined = {**leaves, **adapter}
    if merge:
        return merge_lora_params(combined, source.config.scale), cfg
    return combined, with_lora


def import_checkpoint(hf_dir: str, out_dir: str, *, dtype: str | None = None, lora: str | None = None,
                      merge_lora: bool = False, lora_alpha: float | None = None, overwrite: bool = False,
                      show_progress: bool = True) -> str:
    """HF folder (+ optional adapter) → converted folder; `dtype` None keeps the source's dtypes."""
    loaded = load_checkpoint(hf_dir, weights_dtype=dtype, lora=lora, merge_lora=merge_lora, lora_alpha=lora_alpha,
                             on_host=True, show_progress=show_progress)
    return native.save_converted(out_dir, loaded.leaves, hf_config=loaded.hf_config, lora=loaded.config.lora,
                                 side_files_from=loaded.source_dir, source=os.path.basename(loaded.source_dir),
                                 rotary_buffers=loaded.rotary_buffers, overwrite=overwrite)


def export_checkpoint(ckpt_dir: str, out_dir: str, *, fmt: str = "safetensors", dtype: str | None = None,
                      merge_lora: bool = False, max_shard_bytes: int | None = None,
                      overwrite: bool = False, show_progress: bool = True) -> str:
    """Converted (or HF) folder → HF layout loadable by the released code; adapters go to `OUT_DIR/adapter`."""
    loaded = load_checkpoint(ckpt_dir, merge_lora=merge_lora, on_host=True, show_progress=show_progress)
    cfg = loaded.config
    shapes = {p: (tuple(v.shape), v.dtype) for p, v in loaded.leaves.items()}
    base_targets = owl_targets(cfg, shapes, include_lora=False)
    lora_targets = owl_targets(cfg, shapes, include_base=False) if cfg.lora is not None else None
    return export_hf(out_dir, cfg, base_targets, loaded.leaves, hf_config=loaded.hf_config, fmt=fmt, dtype=dtype,
                     max_shard_bytes=max_shard_bytes, with_rotary_buffers=loaded.rotary_buffers,
                     lora_targets=lora_targets, lora=cfg.lora, side_files_from=loaded.source_dir,
                     overwrite=overwrite, show_progress=show_progress)


def init_from_towers_checkpoint(clip_dir: str, llama_dir: str, out_dir: str, *, num_query_tokens: int = 64,
                                dtype: str | None = None, seed: int = 0, overwrite: bool = False,
                                show_progress: bool = True) -> str:
    """HF CLIP + HF LLaMA (+ a random abstractor) → converted folder: the starting point of stage 1."""
    from owl_jax.checkpoint.towers import init_from_towers

    cfg, leaves = init_from_towers(clip_dir, llama_dir, num_query_tokens=num_query_tokens, dtype=dtype, seed=seed,
                                   show_progress=show_progress)
    return native.save_converted(out_dir, leaves, hf_config=cfg.to_hf_config(), lora=None, side_files_from=llama_dir,
                                 source=f"{os.path.basename(os.path.abspath(clip_dir))} + "
                                        f"{os.path.basename(os.path.abspath(llama_dir))}",
                                 overwrite=overwrite)
