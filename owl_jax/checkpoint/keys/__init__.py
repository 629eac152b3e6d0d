"""Checkpoint key tables: which tensor of a checkpoint fills which Flax leaf, one table per tower.

The released mPLUG-Owl layout (import and export):
- `vision`: `vision_model.*` (ViT-L/14), `abstractor`: `abstractor.*` and `query_tokens`,
  `llama`: `language_model.*` (and the `rotary_emb.inv_freq` buffers import skips and export regenerates);
  `owl_targets` expands the three for one config (with the video layout's additions when `cfg.video`;
  `is_video_key` tells them apart).
The standalone HF towers `init` starts from (import only):
- `clip`: an HF CLIP vision tower → our ViT; `hf_llama`: an HF `LlamaForCausalLM` → our LLaMA.
The language model's table is `llama` or `bloom` (`text_table`; BLOOM's tied head is saved twice: `tied_copies`),
and `hf_llama` or `hf_bloom` for HF towers.
The machinery they share (`KeyRule`, `KeyTarget`, the transforms) is in `targets`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from owl_jax.checkpoint.keys import abstractor, bloom, llama, vision
from owl_jax.checkpoint.keys.llama import is_rotary_buffer
from owl_jax.checkpoint.keys.targets import KeyRule, KeyTarget, expand, linear_modules, transpose_into
from owl_jax.checkpoint.leaves import Path, Shapes
from owl_jax.config import OwlConfig, TextConfig

_ORDER = {vision.TOWER: 0, abstractor.TOWER: 1, llama.TOWER: 2}
TEXT_TABLES = {"llama": llama, "bloom": bloom}  # the language model's table per `TextConfig.model_type`


def text_table(text: TextConfig) -> Any:
    """The key table module of the language model `text` describes (`llama` or `bloom`)."""
    return TEXT_TABLES[text.model_type]


def rotary_buffers(text: TextConfig) -> Iterator[tuple[str, np.ndarray]]:
    """`(key, array)` of the buffers the released layout of `text` saves beside its parameters (LLaMA's
    `rotary_emb.inv_freq`; none for BLOOM)."""
    return text_table(text).rotary_buffers(text)


def tied_copies(cfg: OwlConfig) -> dict[str, str]:
    """`{key: copy}`: keys whose tensor the released layout also saves under a second key (BLOOM's tied head)."""
    table = text_table(cfg.text)
    return table.tied_copies(cfg.text) if hasattr(table, "tied_copies") else {}


def owl_rules(cfg: OwlConfig, *, lora_modules: Iterable[str] = ()) -> list[KeyRule]:
    """The released layout's key table for this config: ViT, abstractor, LLaMA (with adapters' keys for the
    linear layers in `lora_modules`, full Flax module paths)."""
    lora_modules = tuple(lora_modules)
    return (
        vision.rules(lora_modules=lora_modules, video=cfg.video)
        + abstractor.rules(lora_modules=lora_modules, video=cfg.video)
        + text_table(cfg.text).rules(tie_word_embeddings=cfg.text.tie_word_embeddings, lora_modules=lora_modules)
    )


_VIDEO_KEY = re.compile(
    "|".join(
        re.escape(name).replace(re.escape("{i}"), r"\d+") + r"(\..+)?"
        for name in (*vision.VIDEO_HF_MODULES.values(), *abstractor.VIDEO_HF_MODULES.values())
    )
)


def is_video_key(key: str) -> bool:
    """Whether `key` (a checkpoint key, adapters' without peft's prefix) belongs to a module only the
    video layout has: a ViT layer's `temporal.*`, `temporal_query_tokens`, `abstractor.temporal_visual_fc.*`."""
    return _VIDEO_KEY.fullmatch(key) is not None


def lora_module_paths(shapes: Iterable[Path]) -> tuple[str, ...]:
    """The Flax module paths (`/`-joined) of the linear layers that carry adapters among `shapes`."""
    return tuple(sorted("/".join(p[:-1]) for p in shapes if p[-1] == "lora_a"))


def owl_targets(
    cfg: OwlConfig,
    shapes: Shapes,
    *,
    include_base: bool = True,
    include_lora: bool = True,
    include_copies: bool = False,
) -> list[KeyTarget]:
    """Every HF key of the released layout for this config, in checkpoint order (tower by tower, layer by layer).

    Args:
      shapes: `{path: (shape, dtype)}` of the model's leaves; adapters are included where it has `lora_a`.
      include_base, include_lora: keep the base parameters' keys / the adapters' (peft keys without the
        `base_model.model.` prefix).
      include_copies: also list the keys that repeat another key's tensor (`tied_copies`), reading the same
        leaf: an export writes them, an import reads the original only.
    """
    rules = owl_rules(cfg, lora_modules=lora_module_paths(shapes) if include_lora else ())
    if include_copies and include_base:
        by_key = {r.hf_key: r for r in rules}
        rules += [dataclasses.replace(by_key[key], hf_key=copy) for key, copy in tied_copies(cfg).items()]
    is_lora = lambda r: r.path[-1] in ("lora_a", "lora_b")
    rules = [r for r in rules if (include_lora if is_lora(r) else include_base)]
    layers = {
        vision.TOWER: cfg.vision.num_layers,
        abstractor.TOWER: cfg.abstractor.num_layers,
        llama.TOWER: cfg.text.num_layers,
    }
    targets = expand(
        rules, shapes, lambda path: layers[path[0]], patch=(cfg.vision.num_channels, cfg.vision.patch_size)
    )
    return sorted(targets, key=lambda t: (_ORDER[t.path[0]], -1 if t.layer is None else t.layer))


def owl_linear_modules(*, video: bool = False, text_model: str = "llama") -> dict[str, str]:
    """Full Flax module path → HF module name (`{i}` for the layer) of every linear layer (LoRA's candidates),
    with the video layout's when `video`, for the language model `text_model` ("llama" or "bloom")."""
    out: dict[str, Any] = {}
    for table in (vision, abstractor, TEXT_TABLES[text_model]):
        out.update(linear_modules(table.TOWER, table.HF_MODULES, table.KINDS))
        if video and hasattr(table, "VIDEO_KINDS"):
            out.update(linear_modules(table.TOWER, table.VIDEO_HF_MODULES, table.VIDEO_KINDS))
    return out


__all__ = [
    "KeyRule",
    "KeyTarget",
    "is_rotary_buffer",
    "is_video_key",
    "lora_module_paths",
    "owl_linear_modules",
    "owl_rules",
    "owl_targets",
    "rotary_buffers",
    "text_table",
    "tied_copies",
    "transpose_into",
]
