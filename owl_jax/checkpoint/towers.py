"""A fresh `Owl` from separate tower checkpoints: the ViT from HF CLIP, LLaMA from HF LLaMA, the abstractor random.

This is how stage 1 of training starts. The CLIP folder holds a `CLIPVisionModel` or a whole `CLIPModel`
(its text tower and projections are ignored), the LLaMA folder a `LlamaForCausalLM`; both are streamed
one tensor at a time through the same importer as the released checkpoints (`owl_jax.checkpoint.importer`).

The tables below map every tower tensor to its Flax leaf, in the style of `owl_jax.modeling.hf_names`.
CLIP keys are written without the `vision_model.` prefix: transformers 5 saves a `CLIPVisionModel`
without it, while `CLIPModel` (and older `CLIPVisionModel` files) carry it; the prefix is stripped on scan.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax.checkpoint.hf_import import abstract_model
from owl_jax.checkpoint.importer import KeyInventory, check_keys, keep_on_host, stream_leaves
from owl_jax.checkpoint.layout import QKV_PART, RESHAPE, KeyTarget, Path, leaf_shapes
from owl_jax.checkpoint.tensor_files import weight_files
from owl_jax.config import (AbstractorConfig, ConfigError, OwlConfig, TextConfig, VisionConfig, _read_json_source,
                            text_config_from_hf, vision_config_from_hf)
from owl_jax.modeling.abstractor import Abstractor
from owl_jax.modeling.hf_names import COPY, LINEAR, PATCH

CLIP_PREFIX = "vision_model."
CLIP_LAYER = "encoder.layers.{i}."
LLAMA_LAYER = "model.layers.{i}."

# CLIP ViT: (Flax leaf, HF key without `vision_model.`, transform, q/k/v part for `qkv_part`).
_CLIP: tuple[tuple[str, str, str, int], ...] = (
    ("vision_model/patch_embed", "embeddings.patch_embedding.weight", PATCH, 0),
    ("vision_model/cls_token", "embeddings.class_embedding", RESHAPE, 0),
    ("vision_model/position_embedding", "embeddings.position_embedding.weight", RESHAPE, 0),
    ("vision_model/pre_layernorm/scale", "pre_layrnorm.weight", COPY, 0),  # sic: HF's spelling
    ("vision_model/pre_layernorm/bias", "pre_layrnorm.bias", COPY, 0),
    ("vision_model/layers/input_layernorm/scale", CLIP_LAYER + "layer_norm1.weight", COPY, 0),
    ("vision_model/layers/input_layernorm/bias", CLIP_LAYER + "layer_norm1.bias", COPY, 0),
    ("vision_model/layers/query_key_value/kernel", CLIP_LAYER + "self_attn.q_proj.weight", QKV_PART, 0),
    ("vision_model/layers/query_key_value/kernel", CLIP_LAYER + "self_attn.k_proj.weight", QKV_PART, 1),
    ("vision_model/layers/query_key_value/kernel", CLIP_LAYER + "self_attn.v_proj.weight", QKV_PART, 2),
    ("vision_model/layers/query_key_value/bias", CLIP_LAYER + "self_attn.q_proj.bias", QKV_PART, 0),
    ("vision_model/layers/query_key_value/bias", CLIP_LAYER + "self_attn.k_proj.bias", QKV_PART, 1),
    ("vision_model/layers/query_key_value/bias", CLIP_LAYER + "self_attn.v_proj.bias", QKV_PART, 2),
    ("vision_model/layers/dense/kernel", CLIP_LAYER + "self_attn.out_proj.weight", LINEAR, 0),
    ("vision_model/layers/dense/bias", CLIP_LAYER + "self_attn.out_proj.bias", COPY, 0),
    ("vision_model/layers/post_attention_layernorm/scale", CLIP_LAYER + "layer_norm2.weight", COPY, 0),
    ("vision_model/layers/post_attention_layernorm/bias", CLIP_LAYER + "layer_norm2.bias", COPY, 0),
    ("vision_model/layers/fc1/kernel", CLIP_LAYER + "mlp.fc1.weight", LINEAR, 0),
    ("vision_model/layers/fc1/bias", CLIP_LAYER + "mlp.fc1.bias", COPY, 0),
    ("vision_model/layers/fc2/kernel", CLIP_LAYER + "mlp.fc2.weight", LINEAR, 0),
    ("vision_model/layers/fc2/bias", CLIP_LAYER + "mlp.fc2.bias", COPY, 0),
    ("vision_model/post_layernorm/scale", "post_layernorm.weight", COPY, 0),
    ("vision_model/post_layernorm/bias", "post_layernorm.bias", COPY, 0),
)

# LlamaForCausalLM: (Flax leaf, HF key, transform). `lm_head` is absent when the embeddings are tied.
_LLAMA: tuple[tuple[str, str, str], ...] = (
    ("language_model/embed_tokens", "model.embed_tokens.weight", COPY),
    ("language_model/layers/input_layernorm/scale", LLAMA_LAYER + "input_layernorm.weight", COPY),
    ("language_model/layers/q_proj/kernel", LLAMA_LAYER + "self_attn.q_proj.weight", LINEAR),
    ("language_model/layers/k_proj/kernel", LLAMA_LAYER + "self_attn.k_proj.weight", LINEAR),
    ("language_model/layers/v_proj/kernel", LLAMA_LAYER + "self_attn.v_proj.weight", LINEAR),
    ("language_model/layers/o_proj/kernel", LLAMA_LAYER + "self_attn.o_proj.weight", LINEAR),
    ("language_model/layers/post_attention_layernorm/scale", LLAMA_LAYER + "post_attention_layernorm.weight", COPY),
    ("language_model/layers/gate_proj/kernel", LLAMA_LAYER + "mlp.gate_proj.weight", LINEAR),
    ("language_model/layers/up_proj/kernel", LLAMA_LAYER + "mlp.up_proj.weight", LINEAR),
    ("language_model/layers/down_proj/kernel", LLAMA_LAYER + "mlp.down_proj.weight", LINEAR),
    ("language_model/norm/scale", "model.norm.weight", COPY),
    ("language_model/lm_head/kernel", "lm_head.weight", LINEAR),
)

# Tensors the ViT does not use: CLIP's text tower and contrastive head, and `position_ids` buffers
# (older transformers saved them; they always hold arange(T)).
CLIP_IGNORED = re.compile(r"text_model\..*|visual_projection\.weight|text_projection\.weight|logit_scale"
                          r"|(.*\.)?position_ids")
# RoPE frequencies saved by older transformers: recomputed from rope_theta.
LLAMA_IGNORED = re.compile(r"(.*\.)?rotary_emb\.inv_freq")

# HF `CLIPVisionConfig` defaults: a CLIP config.json may omit any field equal to them, and they differ
# from mPLUG-Owl's (ViT-B/32 sizes, layer_norm_eps 1e-5).
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                             image_size=224, patch_size=32, num_channels=3, layer_norm_eps=1e-5,
                             hidden_act="quick_gelu")

Shapes = dict[Path, tuple[tuple[int, ...], Any]]


def _expand(rows: list[tuple[str, str, str, int]], shapes: Shapes, num_layers: int, *, num_heads: int = 0,
            hf_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]]) -> list[KeyTarget]:
    """One `KeyTarget` per HF key; rows with `{i}` become one per layer."""
    targets = []
    for path_text, hf_key, transform, part in rows:
        path = tuple(path_text.split("/"))
        if path not in shapes:
            raise KeyError(f"tower table entry {path_text} is not a parameter of this model")
        stacked = "{i}" in hf_key
        shape = shapes[path][0][1:] if stacked else shapes[path][0]
        target_shape = hf_shape(transform, tuple(shape))
        for i in (range(num_layers) if stacked else [None]):
            targets.append(KeyTarget(hf_key.format(i=i) if stacked else hf_key, path, i, transform, target_shape,
                                     part=part, num_heads=num_heads if transform == QKV_PART else 0))
    return targets


def clip_targets(vision_cfg: VisionConfig, shapes: Shapes) -> list[KeyTarget]:
    """Every tensor of a CLIP ViT checkpoint (keys without `vision_model.`) and the `Owl` leaf it fills.

    Args:
      vision_cfg: the ViT config.
      shapes: `{path: (shape, dtype)}` of the model's leaves (`leaf_shapes` of `abstract_model`).

    Returns:
      Targets whose `hf_shape` is CLIP's: q/k/v weights `(D, D)` and biases `(D,)` (written into the fused
      `(D, 3D)` / `(3D,)` leaf), `class_embedding` `(D,)`, `position_embedding.weight` `(T, D)`,
      `patch_embedding.weight` `(D, C, p, p)`.
    """
    v = vision_cfg

    def hf_shape(transform: str, piece: tuple[int, ...]) -> tuple[int, ...]:
        if transform == QKV_PART:  # fused kernel (D_in, 3·D) / bias (3·D,) → one of q, k, v
            return (piece[-1] // 3,) + piece[:-1]
        if transform == RESHAPE:  # CLIP stores these without the leading broadcast axes: (1, 1, D) → (D,)
            while len(piece) > 1 and piece[0] == 1:
                piece = piece[1:]
            return piece
        if transform == PATCH:
            return (piece[1], v.num_channels, v.patch_size, v.patch_size)
        return tuple(reversed(piece)) if transform == LINEAR else piece

    return _expand(list(_CLIP), shapes, v.num_layers, num_heads=v.num_heads, hf_shape=hf_shape)


def llama_targets(text_cfg: TextConfig, shapes: Shapes) -> list[KeyTarget]:
    """Every tensor of a `LlamaForCausalLM` checkpoint and the `Owl` leaf it fills (HF shapes: Linear `(out, in)`)."""
    rows = [(p, k, t, 0) for p, k, t in _LLAMA if not (text_cfg.tie_word_embeddings and k == "lm_head.weight")]
    hf_shape = lambda transform, piece: tuple(reversed(piece)) if transform == LINEAR else piece
    return _expand(rows, shapes, text_cfg.num_layers, hf_shape=hf_shape)


def clip_vision_config(source: Any) -> VisionConfig:
    """The ViT config of a CLIP folder / config.json / dict (`CLIPModel`: nested `vision_config`; `CLIPVisionModel`: flat)."""
    d = _read_json_source(source)
    if d.get("model_type") not in (None, "clip", "clip_vision_model"):
        raise ConfigError(f"{source}: model_type {d.get('model_type')!r} is not a CLIP model (expected 'clip' or "
                          f"'clip_vision_model')")
    if "vision_config" in d or "vision_config_dict" in d:
        # Old CLIPModel configs also carry `vision_config_dict`, which wins (as in transformers).
        vc = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
    else:
        vc = d
    return vision_config_from_hf({**_CLIP_VISION_DEFAULTS, **{k: x for k, x in vc.items() if x is not None}})


def default_abstractor(vision_hidden: int) -> AbstractorConfig:
    """The 7B abstractor layout resized to a ViT of width `vision_hidden`.

    Heads keep head_dim 64 when `vision_hidden` allows it (else the divisor closest to it); the MLP keeps
    the 2816/1024 ratio, rounded to a multiple of 8.
    """
    base = AbstractorConfig()
    heads = min((h for h in range(1, vision_hidden + 1) if vision_hidden % h == 0),
                key=lambda h: (abs(vision_hidden // h - base.head_dim), -h))
    ratio = base.intermediate_size / base.hidden_size
    intermediate = max(8, int(round(vision_hidden * ratio / 8)) * 8)
    return AbstractorConfig(hidden_size=vision_hidden, encoder_hidden_size=vision_hidden, num_heads=heads,
                            intermediate_size=intermediate, num_layers=base.num_layers,
                            layer_norm_eps=base.layer_norm_eps, attention_dropout=base.attention_dropout)


def config_from_towers(clip_dir: Any, llama_dir: Any, *, abstractor: AbstractorConfig | None = None,
                       num_query_tokens: int = 64, **runtime: Any) -> OwlConfig:
    """The `OwlConfig` of a model made of these towers (folders, config.json paths or parsed dicts).

    `abstractor` defaults to `default_abstractor(vision hidden size)`; `runtime` sets the run-time fields.
    """
    vision = clip_vision_config(clip_dir)
    tc = _read_json_source(llama_dir)
    if tc.get("model_type", "llama") != "llama":
        raise ConfigError(f"{llama_dir}: model_type {tc.get('model_type')!r}; only LLaMA language models are supported")
    cfg = OwlConfig(vision=vision, abstractor=abstractor or default_abstractor(vision.hidden_size),
                    text=text_config_from_hf(tc), num_query_tokens=num_query_tokens, **runtime)
    return cfg.validate()


def _on_host() -> contextlib.AbstractContextManager:
    # The random abstractor is built on the CPU: the leaves go to `finalize` as host arrays anyway.
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:
        return contextlib.nullcontext()


def random_abstractor(cfg: OwlConfig, *, seed: int = 0, param_dtype: str = "float32") -> dict[Path, np.ndarray]:
    """Freshly initialised abstractor leaves `{('abstractor', ...): array}` (only the `Abstractor` is built)."""
    with _on_host():
        module = Abstractor(cfg.abstractor, cfg.num_query_tokens, cfg.text.hidden_size, param_dtype=param_dtype,
                            rngs=nnx.Rngs(seed))
        flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
        return {("abstractor",) + tuple(str(p) for p in path): np.asarray(v.get_value()) for path, v in flat}


def init_from_towers(clip_dir: str, llama_dir: str, *, abstractor: AbstractorConfig | None = None,
                     num_query_tokens: int = 64, dtype: str | None = None, seed: int = 0,
                     finalize: Callable[[Path, np.ndarray], Any] = keep_on_host,
                     show_progress: bool = True) -> tuple[OwlConfig, dict[Path, Any]]:
    """Every parameter of a fresh `Owl`: ViT from `clip_dir`, LLaMA from `llama_dir`, abstractor random.

    Both checkpoints are checked in full (missing, unexpected and mis-shaped keys raise
    `CheckpointMismatchError`) before any tensor is read.

    Args:
      abstractor: the abstractor layout (default: `default_abstractor` of the ViT width).
      dtype: every leaf's dtype; None keeps each tensor's own dtype and builds the abstractor in float32.
      seed: `nnx.Rngs` seed of the abstractor initialisation.
      finalize: what to do with each completed leaf (keep on host, place on devices, ...).

    Returns:
      The config and `{path: finalize(path, leaf)}` for every parameter of `Owl(config)`; pass it to
      `hf_import.assemble` with `abstract_model(config)`.
    """
    cfg = config_from_towers(clip_dir, llama_dir, abstractor=abstractor, num_query_tokens=num_query_tokens)
    shapes = leaf_shapes(abstract_model(cfg)[1])
    vision_targets, text_targets = clip_targets(cfg.vision, shapes), llama_targets(cfg.text, shapes)
    covered = {t.path for t in vision_targets + text_targets}
    uncovered = sorted("/".join(p) for p in shapes if p not in covered and p[0] != "abstractor")
    if uncovered:  # the tables above fell behind the model
        raise KeyError(f"the tower key tables fill no checkpoint tensor into {uncovered[:8]}")

    clip_inventory = KeyInventory.scan(weight_files(clip_dir)[0],
                                       rename=lambda k: k[len(CLIP_PREFIX):] if k.startswith(CLIP_PREFIX) else k)
    llama_inventory = KeyInventory.scan(weight_files(llama_dir)[0])
    check_keys(clip_inventory, vision_targets, ignore=lambda k: CLIP_IGNORED.fullmatch(k) is not None,
               source=f"CLIP checkpoint {clip_dir}",
               hint="CLIP keys are listed without their 'vision_model.' prefix. Is config.json the one these "
                    "weights were saved with?")
    tied = cfg.text.tie_word_embeddings
    # With tied embeddings a saved `lm_head.weight` is a copy of the embeddings (transformers drops it too).
    check_keys(llama_inventory, text_targets, source=f"LLaMA checkpoint {llama_dir}",
               ignore=lambda k: LLAMA_IGNORED.fullmatch(k) is not None or (tied and k == "lm_head.weight"),
               hint="Is config.json the one these weights were saved with?")

    specs = {p: (s, None) for p, (s, _) in shapes.items()}
    leaves = stream_leaves(clip_inventory, vision_targets, specs, finalize, dtype=dtype, desc="CLIP",
                           show_progress=show_progress)
    leaves.update(stream_leaves(llama_inventory, text_targets, specs, finalize, dtype=dtype, desc="LLaMA",
                                show_progress=show_progress))
    fresh = random_abstractor(cfg, seed=seed, param_dtype=jnp.dtype(dtype or "float32").name)
    wanted = {p for p in shapes if p[0] == "abstractor"}
    if set(fresh) != wanted or any(a.shape != shapes[p][0] for p, a in fresh.items()):
        raise KeyError(f"the Abstractor module's parameters {sorted(fresh)[:4]}... do not match Owl's {sorted(wanted)[:4]}...")
    for path, leaf in fresh.items():
        leaves[path] = finalize(path, leaf)
    return cfg, leaves


__all__ = ["CLIP_IGNORED", "LLAMA_IGNORED", "clip_targets", "clip_vision_config", "config_from_towers",
           "default_abstractor", "init_from_towers", "llama_targets", "random_abstractor"]
