"""Init from towers: a fresh `Owl` from separate tower checkpoints, the ViT from HF CLIP, LLaMA from HF LLaMA
(or BLOOM from HF BLOOM), the abstractor random.

This is how stage 1 of training starts. The CLIP folder holds a `CLIPVisionModel` or a whole `CLIPModel`
(its text tower and projections are ignored), the language model folder (`llama_dir`) a `LlamaForCausalLM`
or a `BloomForCausalLM` (its config's `model_type` says which); both are checked in full and streamed one
leaf at a time through the same importer as the released checkpoints (`streaming.py`), with the key tables
`keys.clip` and `keys.hf_llama` / `keys.hf_bloom`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax.checkpoint import converted
from owl_jax.checkpoint.keys import clip, hf_bloom, hf_llama
from owl_jax.checkpoint.leaves import Path, abstract_model, leaf_shapes
from owl_jax.checkpoint.streaming import KeyInventory, check_keys, keep_on_host, stream_leaves
from owl_jax.checkpoint.tensor_files import weight_files
from owl_jax.config import AbstractorConfig, ConfigError, OwlConfig, TextConfig, VisionConfig
from owl_jax.hf_bloom import bloom_text_config_from_hf
from owl_jax.hf_config import Fields, read_json_source, text_config_from_hf, vision_config_from_hf, where_of
from owl_jax.modeling.abstractor import Abstractor

# HF `CLIPVisionConfig` defaults: a CLIP config.json may omit any field equal to them, and they differ
# from mPLUG-Owl's (ViT-B/32 sizes, layer_norm_eps 1e-5).
_CLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    num_channels=3,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
)


def clip_vision_config(source: Any) -> VisionConfig:
    """The ViT config of a CLIP folder / config.json / dict.

    `CLIPModel` nests it under `vision_config`; `CLIPVisionModel` is flat.
    """
    d = read_json_source(source)
    where = where_of(source)
    if d.get("model_type") not in (None, "clip", "clip_vision_model"):
        raise ConfigError(
            f"{where}: model_type {d.get('model_type')!r} is not a CLIP model (expected 'clip' or 'clip_vision_model')"
        )
    prefix = ""
    if "vision_config" in d or "vision_config_dict" in d:
        # Old CLIPModel configs also carry `vision_config_dict`, which wins (as in transformers).
        top = Fields(d, where)
        vc = {**top.optional_section("vision_config"), **top.optional_section("vision_config_dict")}
        prefix = "vision_config."
    else:
        vc = d
    merged = {**_CLIP_VISION_DEFAULTS, **{k: x for k, x in vc.items() if x is not None}}
    return vision_config_from_hf(merged, where=where, prefix=prefix)


def default_abstractor(vision_hidden: int) -> AbstractorConfig:
    """The 7B abstractor layout resized to a ViT of width `vision_hidden`.

    Heads keep head_dim 64 when `vision_hidden` allows it (else the divisor closest to it); the MLP keeps
    the 2816/1024 ratio, rounded to a multiple of 8.
    """
    base = AbstractorConfig()
    heads = min(
        (h for h in range(1, vision_hidden + 1) if vision_hidden % h == 0),
        key=lambda h: (abs(vision_hidden // h - base.head_dim), -h),
    )
    ratio = base.intermediate_size / base.hidden_size
    intermediate = max(8, int(round(vision_hidden * ratio / 8)) * 8)
    return AbstractorConfig(
        hidden_size=vision_hidden,
        encoder_hidden_size=vision_hidden,
        num_heads=heads,
        intermediate_size=intermediate,
        num_layers=base.num_layers,
        layer_norm_eps=base.layer_norm_eps,
        attention_dropout=base.attention_dropout,
    )


def config_from_towers(
    clip_dir: Any,
    llama_dir: Any,
    *,
    abstractor: AbstractorConfig | None = None,
    num_query_tokens: int = 64,
    **runtime: Any,
) -> OwlConfig:
    """The `OwlConfig` of a model made of these towers (folders, config.json paths or parsed dicts).

    `abstractor` defaults to `default_abstractor(vision hidden size)`; `runtime` sets the run-time fields.
    """
    vision = clip_vision_config(clip_dir)
    tc = read_json_source(llama_dir)
    where = where_of(llama_dir)
    text_type = tc.get("model_type", "llama")
    if text_type not in ("llama", "bloom"):
        raise ConfigError(f"{where}: model_type {text_type!r}; only LLaMA and BLOOM language models are supported")
    read_text = bloom_text_config_from_hf if text_type == "bloom" else text_config_from_hf
    cfg = OwlConfig(
        vision=vision,
        abstractor=abstractor or default_abstractor(vision.hidden_size),
        text=read_text(tc, where=where),
        num_query_tokens=num_query_tokens,
        **runtime,
    )
    return cfg.validate()


def _text_inventory(folder: str, text: TextConfig) -> KeyInventory:
    """The keys of an HF LLaMA or BLOOM folder as the tower's table lists them (BLOOM: without `transformer.`,
    a tied `lm_head.weight` read as the embeddings when they are missing, dropped otherwise)."""
    files = weight_files(folder)[0]
    if text.model_type == "bloom":
        return KeyInventory.scan(files, rename=hf_bloom.strip_prefix).fold_copies(hf_bloom.tied_copies(text))
    return KeyInventory.scan(files)


def _on_host() -> contextlib.AbstractContextManager:
    # The random abstractor is built on the CPU: the leaves go to `finalize` as host arrays anyway.
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:
        return contextlib.nullcontext()


def random_abstractor(cfg: OwlConfig, *, seed: int = 0, param_dtype: str = "float32") -> dict[Path, np.ndarray]:
    """Freshly initialised abstractor leaves `{('abstractor', ...): array}` (only the `Abstractor` is built)."""
    with _on_host():
        module = Abstractor(
            cfg.abstractor, cfg.num_query_tokens, cfg.text.hidden_size, param_dtype=param_dtype, rngs=nnx.Rngs(seed)
        )
        flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
        return {("abstractor",) + tuple(str(p) for p in path): np.asarray(v.get_value()) for path, v in flat}


def init_from_towers(
    clip_dir: str,
    llama_dir: str,
    *,
    abstractor: AbstractorConfig | None = None,
    num_query_tokens: int = 64,
    dtype: str | None = None,
    seed: int = 0,
    finalize: Callable[[Path, np.ndarray], Any] = keep_on_host,
    show_progress: bool = True,
) -> tuple[OwlConfig, dict[Path, Any]]:
    """Every parameter of a fresh `Owl`: ViT from `clip_dir`, LLaMA (or BLOOM) from `llama_dir`, abstractor random.

    Both checkpoints are checked in full (missing, unexpected and mis-shaped keys raise
    `CheckpointMismatchError`) before any tensor is read.

    Args:
      abstractor: the abstractor layout (default: `default_abstractor` of the ViT width).
      dtype: every leaf's dtype; None keeps each tensor's own dtype and builds the abstractor in float32.
      seed: `nnx.Rngs` seed of the abstractor initialisation.
      finalize: what to do with each completed leaf (keep on host, place on devices, ...).

    Returns:
      The config and `{path: finalize(path, leaf)}` for every parameter of `Owl(config)`; pass it to
      `leaves.assemble` with `abstract_model(config)`.
    """
    cfg = config_from_towers(clip_dir, llama_dir, abstractor=abstractor, num_query_tokens=num_query_tokens)
    shapes = leaf_shapes(abstract_model(cfg)[1])
    text_keys, text_name = (hf_bloom, "BLOOM") if cfg.text.model_type == "bloom" else (hf_llama, "LLaMA")
    vision_targets, text_targets = clip.targets(cfg.vision, shapes), text_keys.targets(cfg.text, shapes)
    covered = {t.path for t in vision_targets + text_targets}
    uncovered = sorted("/".join(p) for p in shapes if p not in covered and p[0] != "abstractor")
    if uncovered:  # the tables above fell behind the model
        raise KeyError(f"the tower key tables fill no checkpoint tensor into {uncovered[:8]}")

    clip_inventory = KeyInventory.scan(weight_files(clip_dir)[0], rename=clip.strip_prefix)
    llama_inventory = _text_inventory(llama_dir, cfg.text)
    check_keys(
        clip_inventory,
        vision_targets,
        ignore=lambda k: clip.IGNORED.fullmatch(k) is not None,
        source=f"CLIP checkpoint {clip_dir}",
        hint="CLIP keys are listed without their 'vision_model.' prefix. Is config.json the one these "
        "weights were saved with?",
    )
    tied = cfg.text.tie_word_embeddings
    # With tied embeddings a saved `lm_head.weight` is a copy of the embeddings (transformers drops it too).
    check_keys(
        llama_inventory,
        text_targets,
        source=f"{text_name} checkpoint {llama_dir}",
        ignore=lambda k: text_keys.IGNORED.fullmatch(k) is not None or (tied and k == "lm_head.weight"),
        hint="Is config.json the one these weights were saved with?",
    )

    specs = {p: (s, None) for p, (s, _) in shapes.items()}
    leaves = stream_leaves(
        clip_inventory, vision_targets, specs, finalize, dtype=dtype, desc="CLIP", show_progress=show_progress
    )
    leaves.update(
        stream_leaves(
            llama_inventory, text_targets, specs, finalize, dtype=dtype, desc=text_name, show_progress=show_progress
        )
    )
    fresh = random_abstractor(cfg, seed=seed, param_dtype=jnp.dtype(dtype or "float32").name)
    wanted = {p for p in shapes if p[0] == "abstractor"}
    if set(fresh) != wanted or any(a.shape != shapes[p][0] for p, a in fresh.items()):
        raise KeyError(
            f"the Abstractor module's parameters {sorted(fresh)[:4]}... do not match Owl's {sorted(wanted)[:4]}..."
        )
    for path, leaf in fresh.items():
        leaves[path] = finalize(path, leaf)
    return cfg, leaves


def init_from_towers_checkpoint(
    clip_dir: str,
    llama_dir: str,
    out_dir: str,
    *,
    num_query_tokens: int = 64,
    dtype: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    show_progress: bool = True,
) -> str:
    """HF CLIP + HF LLaMA (+ a random abstractor) → converted folder (atomically): the starting point of stage 1.

    The folder's `config.json` is `OwlConfig.to_hf_config()`; tokenizer and generation files come from
    `llama_dir`. Returns its path.
    """
    cfg, leaves = init_from_towers(
        clip_dir, llama_dir, num_query_tokens=num_query_tokens, dtype=dtype, seed=seed, show_progress=show_progress
    )
    return converted.save_converted(
        out_dir,
        leaves,
        hf_config=cfg.to_hf_config(),
        lora=None,
        side_files_from=llama_dir,
        source=f"{os.path.basename(os.path.abspath(clip_dir))} + {os.path.basename(os.path.abspath(llama_dir))}",
        overwrite=overwrite,
    )


__all__ = [
    "clip_vision_config",
    "config_from_towers",
    "default_abstractor",
    "init_from_towers",
    "init_from_towers_checkpoint",
    "random_abstractor",
]
