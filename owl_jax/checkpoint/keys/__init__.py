"""Checkpoint key tables: which tensor of a checkpoint fills which Flax leaf, one table per tower.

The released mPLUG-Owl layout (import and export):
- `vision`: `vision_model.*` (ViT-L/14), `abstractor`: `abstractor.*` and `query_tokens`,
  `llama`: `language_model.*` (and the `rotary_emb.inv_freq` buffers import skips and export regenerates);
  `owl_targets` expands the three for one config.
The standalone HF towers `init` starts from (import only):
- `clip`: an HF CLIP vision tower → our ViT; `hf_llama`: an HF `LlamaForCausalLM` → our LLaMA.
The machinery they share (`KeyRule`, `KeyTarget`, the transforms) is in `targets`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from owl_jax.checkpoint.keys import abstractor, llama, vision
from owl_jax.checkpoint.keys.llama import is_rotary_buffer, rotary_buffers
from owl_jax.checkpoint.keys.targets import KeyRule, KeyTarget, expand, linear_modules, transpose_into
from owl_jax.checkpoint.leaves import Path, Shapes
from owl_jax.config import OwlConfig

_ORDER = {vision.TOWER: 0, abstractor.TOWER: 1, llama.TOWER: 2}


def owl_rules(cfg: OwlConfig, *, lora_modules: Iterable[str] = ()) -> list[KeyRule]:
    """The released layout's key table for this config: ViT, abstractor, LLaMA (with adapters' keys for the
    linear layers in `lora_modules`, full Flax module paths)."""
    lora_modules = tuple(lora_modules)
    return (
        vision.rules(lora_modules=lora_modules)
        + abstractor.rules(lora_modules=lora_modules)
        + llama.rules(tie_word_embeddings=cfg.text.tie_word_embeddings, lora_modules=lora_modules)
    )


def lora_module_paths(shapes: Iterable[Path]) -> tuple[str, ...]:
    """The Flax module paths (`/`-joined) of the linear layers that carry adapters among `shapes`."""
    return tuple(sorted("/".join(p[:-1]) for p in shapes if p[-1] == "lora_a"))


def owl_targets(
    cfg: OwlConfig, shapes: Shapes, *, include_base: bool = True, include_lora: bool = True
) -> list[KeyTarget]:
    """Every HF key of the released layout for this config, in checkpoint order (tower by tower, layer by layer).

    Args:
      shapes: `{path: (shape, dtype)}` of the model's leaves; adapters are included where it has `lora_a`.
      include_base, include_lora: keep the base parameters' keys / the adapters' (peft keys without the
        `base_model.model.` prefix).
    """
    rules = owl_rules(cfg, lora_modules=lora_module_paths(shapes) if include_lora else ())
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


def owl_linear_modules() -> dict[str, str]:
    """Full Flax module path → HF module name (`{i}` for the layer) of every linear layer (LoRA's candidates)."""
    out: dict[str, Any] = {}
    for table in (vision, abstractor, llama):
        out.update(linear_modules(table.TOWER, table.HF_MODULES, table.KINDS))
    return out


__all__ = [
    "KeyRule",
    "KeyTarget",
    "is_rotary_buffer",
    "lora_module_paths",
    "owl_linear_modules",
    "owl_rules",
    "owl_targets",
    "rotary_buffers",
    "transpose_into",
]
