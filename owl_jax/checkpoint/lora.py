"""LoRA adapters: reading peft adapters and trainer checkpoints, writing peft adapters, merging.

Two sources are accepted:
- a peft adapter folder: `adapter_config.json` + `adapter_model.safetensors|bin`, keys
  `base_model.model.<module>.lora_{A,B}.weight`;
- a training checkpoint of a `PeftModel` (HF Trainer's `checkpoint-N/`): every key prefixed
  `base_model.model.`, adapters ending `lora_{A,B}.default.weight`. Only the adapter keys are read (the
  base weights come from the base model). Its scale comes from an `adapter_config.json` in the folder or
  its parent (where the Trainer's final `save_pretrained` writes it), else from `lora_alpha`, else the
  released recipe's alpha/r = 32/8 = 4 is assumed (with a warning).

The adapters' keys, without peft's `base_model.model.` prefix (`PEFT_PREFIX`), are part of the key tables
(`owl_jax.checkpoint.keys`); writing an adapter is `export.write_peft_adapter`.

A merge adds `alpha/r · A B` to each Flax kernel `(in, out)` (= `W += alpha/r · B @ A` in PyTorch layout),
computed in float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any

import numpy as np

from owl_jax.checkpoint.errors import CheckpointError
from owl_jax.checkpoint.keys import owl_linear_modules
from owl_jax.checkpoint.streaming import KeyInventory
from owl_jax.checkpoint.tensor_files import weight_files
from owl_jax.config import ConfigError, LoRAConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RELEASED_RECIPE_SCALE = 32 / 8  # pipeline/train.py: --lora-r 8 --lora-alpha 32

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


@dataclasses.dataclass
class LoRASource:
    """A located adapter: its files, its config, and how file keys map to canonical peft keys."""

    files: list[str]
    config: LoRAConfig
    kind: str  # "adapter" | "trainer"

    @staticmethod
    def canonical_key(file_key: str) -> str | None:
        """`base_model.model.<module>.lora_A[.default].weight` → `<module>.lora_A.weight`; others → None."""
        key = file_key[len(PEFT_PREFIX) :] if file_key.startswith(PEFT_PREFIX) else file_key
        m = _LORA_KEY.match(key)
        if m is None:
            return None
        return f"{m['module']}.lora_{m['which']}.weight"


def locate_lora(path: str, *, lora_alpha: float | None = None) -> LoRASource:
    """Find the adapter weights and config in `path` (peft adapter folder or trainer checkpoint)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"LoRA source {path} is not a folder")
    adapter_files = [os.path.join(path, n) for n in ADAPTER_WEIGHTS if os.path.isfile(os.path.join(path, n))]
    if adapter_files:
        files, kind = adapter_files[:1], "adapter"
    else:
        try:
            files, _ = weight_files(path)
        except CheckpointError:
            raise CheckpointError(
                f"{path} holds neither a peft adapter ({' or '.join(ADAPTER_WEIGHTS)}) nor a "
                f"training checkpoint (pytorch_model.bin / model.safetensors)"
            ) from None
        kind = "trainer"
    config_path = next(
        (
            p
            for p in (
                os.path.join(path, ADAPTER_CONFIG),
                os.path.join(os.path.dirname(os.path.abspath(path)), ADAPTER_CONFIG),
            )
            if os.path.isfile(p)
        ),
        None,
    )
    inventory = KeyInventory.scan(files, rename=LoRASource.canonical_key)
    if not inventory.entries:
        raise CheckpointError(f"{path}: no LoRA keys (`*.lora_A.weight`, `*.lora_B.weight`) in {files}")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in inventory.entries})
    ranks = {
        inventory.entries[f"{m}.lora_A.weight"][0][0] for m in modules if f"{m}.lora_A.weight" in inventory.entries
    }
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: LoRA A matrices have differing ranks {sorted(ranks)}")
    rank = ranks.pop()
    if config_path is not None:
        with open(config_path, encoding="utf-8") as f:
            config = LoRAConfig.from_peft_dict(json.load(f))
        if config.rank != rank:
            raise CheckpointError(f"{config_path} says r={config.rank} but the adapter weights have rank {rank}")
        if lora_alpha is not None:
            config = dataclasses.replace(config, alpha=float(lora_alpha))
    else:
        if kind == "adapter":
            raise CheckpointError(f"{path} has adapter weights but no {ADAPTER_CONFIG}")
        if lora_alpha is None:
            lora_alpha = RELEASED_RECIPE_SCALE * rank
            warnings.warn(
                f"{path}: no {ADAPTER_CONFIG} here or in the parent folder; assuming the released "
                f"recipe's scale alpha/r = 4 (alpha={lora_alpha:g} for r={rank}). Pass lora_alpha= "
                f"to override.",
                stacklevel=2,
            )
        config = LoRAConfig(rank=rank, alpha=float(lora_alpha), dropout=0.0, target_modules=_exact_pattern(modules))
    return LoRASource(files=files, config=config, kind=kind)


def _exact_pattern(modules: list[str]) -> str:
    """A regex matching exactly these module names, with layer indices generalised to any layer."""
    templates = sorted({re.sub(r"\.\d+\.", r".{i}.", m) for m in modules})
    return "(" + "|".join(re.escape(t).replace(re.escape("{i}"), r"\d+") for t in templates) + ")"


def lora_module_names(config: LoRAConfig, num_layers: dict[str, int]) -> list[str]:
    """The Flax module paths of linear layers the config targets (validates stacked consistency)."""
    from owl_jax.modeling.linear import lora_targeted

    chosen = []
    for path, hf_module in owl_linear_modules().items():
        stack = num_layers.get(path.split("/")[0]) if "/layers/" in path else None
        try:
            if lora_targeted(config, hf_module, stack):
                chosen.append(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return chosen


def merge_lora(kernel: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
    """`kernel + scale · A B` in float32, returned in `kernel`'s dtype; works on stacked leaves too."""
    delta = np.matmul(lora_a.astype(np.float32), lora_b.astype(np.float32))
    return (kernel.astype(np.float32) + np.float32(scale) * delta).astype(kernel.dtype)


def merge_lora_params(params: dict[tuple[str, ...], Any], scale: float) -> dict[tuple[str, ...], Any]:
    """Fold every `lora_a`/`lora_b` pair of a flat `{path: array}` dict into its kernel (host arrays)."""
    out = {p: v for p, v in params.items() if p[-1] not in ("lora_a", "lora_b")}
    for path in [p for p in params if p[-1] == "lora_a"]:
        module = path[:-1]
        out[module + ("kernel",)] = merge_lora(
            np.asarray(params[module + ("kernel",)]),
            np.asarray(params[path]),
            np.asarray(params[module + ("lora_b",)]),
            scale,
        )
    return out
