"""Released mPLUG-Owl checkpoints (HF layout) → Flax leaves and `Owl` models."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from owl_jax.checkpoint.importer import KeyInventory, check_keys, keep_on_host, stream_leaves
from owl_jax.checkpoint.layout import Path, is_rotary_buffer, leaf_shapes, owl_targets
from owl_jax.checkpoint.lora import LoRASource, merge_lora
from owl_jax.checkpoint.tensor_files import weight_files
from owl_jax.config import OwlConfig
from owl_jax.modeling import Owl
from owl_jax.sharding import state_shardings


def abstract_model(cfg: OwlConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and shape-only state of `Owl(cfg)` (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Owl(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def flat_shardings(state: nnx.State, mesh: jax.sharding.Mesh) -> dict[Path, jax.sharding.Sharding]:
    flat = nnx.to_flat_state(state_shardings(state, mesh))
    return {tuple(str(p) for p in path): (v.get_value() if hasattr(v, "get_value") else v.value) for path, v in flat}


def assemble(graphdef: nnx.GraphDef, abstract: nnx.State, leaves: dict[Path, Any]) -> Owl:
    """Put `leaves` (`{path: array}`) into the abstract state and build the module."""
    flat = []
    missing = []
    for path, var in nnx.to_flat_state(abstract):
        key = tuple(str(p) for p in path)
        if key not in leaves:
            missing.append("/".join(key))
            continue
        flat.append((path, var.replace(leaves[key])))
    if missing:
        raise KeyError(f"no values for parameters {missing[:8]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_hf_leaves(hf_dir: str, cfg: OwlConfig, *, dtype: str | None = None, lora: LoRASource | None = None,
                   merge: bool = False, finalize: Callable[[Path, np.ndarray], Any] = keep_on_host,
                   show_progress: bool = True) -> tuple[OwlConfig, dict[Path, Any]]:
    """Stream a released checkpoint (and optionally a LoRA adapter) into Flax leaves.

    Args:
      cfg: the config read from `hf_dir/config.json` (its `lora` is set here from `lora`).
      dtype: the leaves' dtype; None keeps each tensor's own dtype.
      lora: an adapter to add as LoRA parameters, or (with `merge`) to fold into the kernels.
      finalize: what to do with each completed leaf (keep on host, place on devices, ...).

    Returns:
      The model config (with `lora` set when adapters are kept) and `{path: finalize(leaf)}`.
    """
    model_cfg = cfg.replace(lora=lora.config if lora is not None else None)
    shapes = leaf_shapes(abstract_model(model_cfg)[1])
    files, _ = weight_files(hf_dir)
    inventory = KeyInventory.scan(files)
    base_targets = owl_targets(model_cfg, shapes, include_lora=False)
    check_keys(inventory, base_targets, ignore=is_rotary_buffer, source=f"checkpoint {hf_dir}",
               hint="Is config.json the one these weights were saved with?")
    specs = {p: (s, dtype) for p, (s, _) in shapes.items()}

    lora_leaves: dict[Path, np.ndarray] = {}
    if lora is not None:
        lora_inventory = KeyInventory.scan(lora.files, rename=LoRASource.canonical_key)
        lora_targets = owl_targets(model_cfg, shapes, include_base=False)
        check_keys(lora_inventory, lora_targets, source=f"LoRA adapter {lora.files[0]}",
                   hint=f"adapter config: r={lora.config.rank}, target_modules={lora.config.target_modules!r}")
        lora_dtype = None if merge else dtype
        lora_leaves = stream_leaves(lora_inventory, lora_targets, {p: (s, lora_dtype) for p, (s, _) in shapes.items()},
                                    keep_on_host, desc="adapter", show_progress=show_progress)

    base_finalize = finalize
    if lora is not None and merge:
        model_cfg = model_cfg.replace(lora=None)
        scale = lora.config.scale

        def base_finalize(path: Path, leaf: np.ndarray) -> Any:
            module = path[:-1]
            if path[-1] == "kernel" and module + ("lora_a",) in lora_leaves:
                leaf = merge_lora(leaf, lora_leaves[module + ("lora_a",)], lora_leaves[module + ("lora_b",)], scale)
            return finalize(path, leaf)

    leaves = stream_leaves(inventory, base_targets, specs, base_finalize, dtype=dtype, desc="import",
                           show_progress=show_progress)
    if lora is not None and not merge:
        for path, leaf in lora_leaves.items():
            leaves[path] = finalize(path, leaf)
    return model_cfg, leaves


def host_leaves(model: Owl) -> dict[Path, np.ndarray]:
    """The model's parameters as host numpy arrays, `{path: array}`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out[tuple(str(p) for p in path)] = np.asarray(jax.device_get(value))
    return out


__all__ = ["abstract_model", "assemble", "flat_shardings", "host_leaves", "load_hf_leaves"]
