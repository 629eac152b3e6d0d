"""Released mPLUG-Owl checkpoints (the HF layout: `config.json` + `.bin` or safetensors, single or sharded) → leaves.

`open_released` checks every key of the folder (and of a LoRA adapter, if given) against the config
before any tensor is read, then hands back the leaves as `PendingLeaf`s: each is read from the files
when materialized, so the caller decides where each leaf goes and how many are held at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from owl_jax.checkpoint.keys import owl_targets, text_table, tied_copies
from owl_jax.checkpoint.layout import W1_KEY, check_layout, with_abstractor_width
from owl_jax.checkpoint.leaves import Path, PendingLeaf, abstract_model, leaf_shapes
from owl_jax.checkpoint.lora import LoRASource, merge_lora
from owl_jax.checkpoint.streaming import KeyInventory, LeafReader, check_keys, keep_on_host, stream_leaves
from owl_jax.checkpoint.tensor_files import weight_files
from owl_jax.config import OwlConfig


@contextlib.contextmanager
def open_released(
    hf_dir: str,
    cfg: OwlConfig,
    *,
    dtype: str | None = None,
    lora: LoRASource | None = None,
    merge: bool = False,
    show_progress: bool = True,
) -> Iterator[tuple[OwlConfig, dict[Path, PendingLeaf | np.ndarray]]]:
    """Check a released checkpoint (and optionally a LoRA adapter) and yield its leaves, read on demand.

    Args:
      hf_dir: the folder.
      cfg: the config read from `hf_dir/config.json` (its `lora` is set here from `lora`).
      dtype: the leaves' dtype; None keeps each tensor's own dtype.
      lora: an adapter to add as LoRA parameters, or (with `merge`) to fold into the kernels.

    Yields:
      The model config (with `lora` set when adapters are kept) and `{path: leaf}`: a `PendingLeaf` for
      every base parameter (valid inside the block), host arrays for kept adapters (`lora_a (r, in)`,
      `lora_b (out, r)` per layer, stacked like their kernels).

    Raises:
      CheckpointMismatchError: naming every missing, unexpected and mis-shaped key (in one line the video
        layout's keys, when `cfg` builds the image layout).
    """
    files, _ = weight_files(hf_dir)
    inventory = KeyInventory.scan(files).fold_copies(tied_copies(cfg))  # a tied head saved twice: read once
    check_layout(cfg, inventory.entries, f"checkpoint {hf_dir}")
    cfg = with_abstractor_width(cfg, inventory.entries[W1_KEY][0][0] if W1_KEY in inventory.entries else None)
    model_cfg = cfg.replace(lora=lora.config if lora is not None else None)
    shapes = leaf_shapes(abstract_model(model_cfg)[1])
    base_targets = owl_targets(model_cfg, shapes, include_lora=False)
    check_keys(
        inventory,
        base_targets,
        ignore=text_table(cfg.text).is_rotary_buffer,
        source=f"checkpoint {hf_dir}",
        hint="Is config.json the one these weights were saved with?",
    )

    adapter: dict[Path, np.ndarray] = {}
    if lora is not None:
        lora_inventory = KeyInventory.scan(lora.files, rename=LoRASource.canonical_key)
        lora_targets = owl_targets(model_cfg, shapes, include_base=False)
        check_keys(
            lora_inventory,
            lora_targets,
            source=f"LoRA adapter {lora.files[0]}",
            hint=f"adapter config: r={lora.config.rank}, target_modules={lora.config.target_modules!r}",
        )
        lora_dtype = None if merge else dtype
        adapter = stream_leaves(
            lora_inventory,
            lora_targets,
            {p: (s, lora_dtype) for p, (s, _) in shapes.items()},
            keep_on_host,
            desc="adapter",
            show_progress=show_progress,
        )

    specs = {p: (s, dtype) for p, (s, _) in shapes.items()}
    with LeafReader(inventory, base_targets, specs, dtype=dtype, show_progress=show_progress) as reader:
        merging = lora is not None and merge
        scale = lora.config.scale if merging else 0.0
        leaves: dict[Path, Any] = {
            p: reader.pending(p, then=_merger(p, adapter, scale) if merging else None) for p in reader.paths
        }
        if merging:
            model_cfg = model_cfg.replace(lora=None)
        else:
            leaves.update(adapter)
        yield model_cfg, leaves


def _merger(path: Path, adapter: dict[Path, np.ndarray], scale: float):
    """What to do with the base leaf at `path` once read: fold its adapter in, if it has one."""
    module = path[:-1]
    if path[-1] != "kernel" or module + ("lora_a",) not in adapter:
        return None
    a, b = adapter[module + ("lora_a",)], adapter[module + ("lora_b",)]
    return lambda kernel: merge_lora(kernel, a, b, scale)
