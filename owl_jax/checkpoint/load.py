"""Loading any supported checkpoint folder into leaves, and `import` (a folder → a converted folder).

Supported sources: an HF-layout folder of the released model (`released.py`: `config.json` + `.bin` or
safetensors, single or sharded) and a converted folder (`converted.py`), each optionally with a LoRA
adapter on top (`lora.py`), kept as LoRA parameters or merged into the kernels.

`open_checkpoint` leaves the released layout's parameters pending (each read when materialized), which
lets `import_checkpoint` write each leaf as soon as it is read; `load_checkpoint` reads them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from owl_jax.checkpoint import converted
from owl_jax.checkpoint.errors import CheckpointError
from owl_jax.checkpoint.keys import owl_targets
from owl_jax.checkpoint.layout import W1_PATH, with_abstractor_width
from owl_jax.checkpoint.leaves import Path, abstract_model, flat_shardings, largest_first, leaf_shapes, materialize
from owl_jax.checkpoint.lora import LoRASource, locate_lora, merge_lora_params
from owl_jax.checkpoint.released import open_released
from owl_jax.checkpoint.streaming import KeyInventory, check_keys, keep_on_host, stream_leaves, to_devices
from owl_jax.config import OwlConfig
from owl_jax.hf_config import owl_config_from_hf, read_json_source
from owl_jax.quant.load import quantize_loaded, quantized_for_import, resolve_quantization, stored_quantization
from owl_jax.quant.spec import QUANT_LEAVES


@dataclasses.dataclass
class LoadedCheckpoint:
    config: OwlConfig  # the model the leaves fill (`lora` set when adapters are kept)
    leaves: dict[Path, Any]  # `{path: array}`; inside `open_checkpoint`, released parameters are `PendingLeaf`s
    hf_config: dict[str, Any]  # the source's config.json, unchanged
    source_dir: str
    rotary_buffers: bool  # whether the source layout carries `rotary_emb.inv_freq` buffers


def _read_hf_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{folder} has no config.json; expected an HF-layout mPLUG-Owl folder or a folder "
            f"written by convert_weights.py"
        )
    return read_json_source(path)  # a JSON object, or a ConfigError naming the file


def _finalizer(cfg: OwlConfig, mesh: jax.sharding.Mesh | None, on_host: bool):
    if on_host:
        return keep_on_host
    shardings = flat_shardings(abstract_model(cfg)[1], mesh) if mesh is not None else None
    return to_devices(shardings)


@contextlib.contextmanager
def open_checkpoint(
    path: str,
    *,
    weights_dtype: str | None = None,
    lora: str | None = None,
    merge_lora: bool = False,
    lora_alpha: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    on_host: bool = False,
    show_progress: bool = True,
    runtime: dict[str, Any] | None = None,
) -> Iterator[LoadedCheckpoint]:
    """`load_checkpoint`, except that the parameters of a released-layout folder stay `PendingLeaf`s (host
    arrays once materialized, whatever `mesh`/`on_host` say), readable while the block runs."""
    path = os.path.abspath(path)
    hf_config = _read_hf_config(path)
    base_cfg = owl_config_from_hf(hf_config, where=os.path.join(path, "config.json"), **(runtime or {}))
    base_cfg = base_cfg.replace(quant=None)  # the leaves as stored: quantized only if the folder says so
    lora_source = locate_lora(lora, lora_alpha=lora_alpha) if lora else None

    if not converted.is_converted(path):
        with open_released(
            path, base_cfg, dtype=weights_dtype, lora=lora_source, merge=merge_lora, show_progress=show_progress
        ) as (cfg, leaves):
            yield LoadedCheckpoint(cfg, leaves, hf_config, path, rotary_buffers=True)
        return

    meta = converted.read_meta(path)
    stored_lora = converted.lora_config_of(meta, os.path.join(path, converted.META_FILE))
    if stored_lora is not None and lora_source is not None:
        raise CheckpointError(
            f"{path} already holds LoRA adapters; merge them first (export --merge-lora or "
            f"import --merge-lora) before applying another adapter"
        )
    stored_quant = converted.quant_spec_of(meta, os.path.join(path, converted.META_FILE))
    stored_cfg = base_cfg.replace(lora=stored_lora, quant=stored_quant)
    if stored_cfg.video:  # the abstractor's SwiGLU width of the weights (`layout.with_abstractor_width`)
        w1 = converted.stored_shapes(path).get(W1_PATH)
        stored_cfg = with_abstractor_width(stored_cfg, None if w1 is None else w1[-1])
    shapes = leaf_shapes(abstract_model(stored_cfg)[1])
    rotary = meta.get("rotary_buffers", True)
    needs_host = on_host or lora_source is not None or (merge_lora and stored_lora is not None)
    if not needs_host:
        shardings = flat_shardings(abstract_model(stored_cfg)[1], mesh) if mesh is not None else None
        leaves = converted.load_converted_leaves(path, shapes, dtype=weights_dtype, shardings=shardings)
        yield LoadedCheckpoint(stored_cfg, leaves, hf_config, path, rotary)
        return

    leaves = converted.load_converted_leaves(path, shapes, on_host=True)
    cfg = stored_cfg
    if merge_lora and stored_lora is not None:
        leaves = merge_lora_params(leaves, stored_lora.scale)
        cfg = cfg.replace(lora=None)
    if lora_source is not None:
        leaves, cfg = _apply_adapter(leaves, cfg, lora_source, merge_lora, show_progress)
    if weights_dtype is not None:
        leaves = {
            p: v if p[-1] in QUANT_LEAVES else v.astype(np.dtype(weights_dtype), copy=False) for p, v in leaves.items()
        }
    if not on_host:
        finalize = _finalizer(cfg, mesh, on_host=False)
        leaves = {p: finalize(p, v) for p, v in leaves.items()}
    yield LoadedCheckpoint(cfg, leaves, hf_config, path, rotary)


def load_checkpoint(
    path: str,
    *,
    weights_dtype: str | None = None,
    lora: str | None = None,
    merge_lora: bool = False,
    lora_alpha: float | None = None,
    quantize: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    on_host: bool = False,
    show_progress: bool = True,
    runtime: dict[str, Any] | None = None,
) -> LoadedCheckpoint:
    """Read a checkpoint folder into Flax leaves.

    Args:
      path: HF-layout folder or converted folder.
      weights_dtype: parameter dtype; None keeps the stored dtypes.
      lora: a peft adapter folder or trainer checkpoint to apply; `merge_lora` folds it (or adapters stored in
        a converted folder) into the base kernels.
      lora_alpha: the adapter's alpha when it has no `adapter_config.json`.
      quantize: None, "int8", "int4", a dict of `QuantSpec` fields or a `QuantSpec`: the kernels it selects
        are quantized as they are read (`owl_jax.quant.load`). None loads a quantized folder as stored.
      mesh: place leaves on their shards of this mesh (default: the first device); `on_host` keeps numpy.
      runtime: run-time config fields (`dtype`, `param_dtype`, `scan_layers`, ...) for the returned config.

    Returns:
      The config and `{path: array}` of every parameter of `Owl(config)`: `jax.Array`s, or numpy arrays
      with `on_host`. A released-layout folder is read one leaf at a time, each placed before the next is read.
    """
    spec = resolve_quantization(path, quantize, merge_lora=merge_lora, lora=lora)
    quantize_now = spec is not None and spec != stored_quantization(path)
    with open_checkpoint(
        path,
        weights_dtype=weights_dtype,
        lora=lora,
        merge_lora=merge_lora,
        lora_alpha=lora_alpha,
        mesh=mesh,
        on_host=on_host or quantize_now,
        show_progress=show_progress,
        runtime=runtime,
    ) as loaded:
        if quantize_now:
            return quantize_loaded(loaded, spec, mesh, on_host)
        if not converted.is_converted(loaded.source_dir):
            finalize = _finalizer(loaded.config, mesh, on_host)
            leaves = loaded.leaves
            loaded.leaves = {p: finalize(p, materialize(leaves[p])) for p in largest_first(leaves)}
    return loaded


def _apply_adapter(
    leaves: dict[Path, np.ndarray], cfg: OwlConfig, source: LoRASource, merge: bool, show_progress: bool
) -> tuple[dict[Path, np.ndarray], OwlConfig]:
    with_lora = cfg.replace(lora=source.config)
    shapes = leaf_shapes(abstract_model(with_lora)[1])
    inventory = KeyInventory.scan(source.files, rename=LoRASource.canonical_key)
    targets = owl_targets(with_lora, shapes, include_base=False)
    check_keys(inventory, targets, source=f"LoRA adapter {source.files[0]}")
    adapter = stream_leaves(
        inventory,
        targets,
        {p: (s, None) for p, (s, _) in shapes.items()},
        keep_on_host,
        desc="adapter",
        show_progress=show_progress,
    )
    combined = {**leaves, **adapter}
    if merge:
        return merge_lora_params(combined, source.config.scale), cfg
    return combined, with_lora


def import_checkpoint(
    hf_dir: str,
    out_dir: str,
    *,
    dtype: str | None = None,
    lora: str | None = None,
    merge_lora: bool = False,
    lora_alpha: float | None = None,
    quantize: Any = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> str:
    """HF folder (+ optional adapter) → converted folder; `dtype` None keeps the source's dtypes.

    Each parameter is read from the source just before it is written, so the import holds about one
    parameter (plus the writer's copy of it) in memory, not the model. With `quantize` (as in
    `load_checkpoint`) the selected kernels are stored as integers and scales calibrated from the
    source's values, and `dtype` casts only the leaves that stay float. Returns the folder's path.
    """
    spec = resolve_quantization(hf_dir, quantize, merge_lora=merge_lora, lora=lora)
    quantize_now = spec is not None and spec != stored_quantization(hf_dir)
    with open_checkpoint(
        hf_dir,
        weights_dtype=None if quantize_now else dtype,
        lora=lora,
        merge_lora=merge_lora,
        lora_alpha=lora_alpha,
        on_host=True,
        show_progress=show_progress,
    ) as loaded:
        leaves, cfg = loaded.leaves, loaded.config
        if quantize_now:
            cfg = cfg.replace(quant=spec)
            leaves = quantized_for_import(leaves, cfg, dtype)
        return converted.save_converted(
            out_dir,
            leaves,
            hf_config=loaded.hf_config,
            lora=cfg.lora,
            side_files_from=loaded.source_dir,
            source=os.path.basename(loaded.source_dir),
            rotary_buffers=loaded.rotary_buffers,
            overwrite=overwrite,
            quant=cfg.quant,
        )
