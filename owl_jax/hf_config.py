"""The released `MplugOwlConfig` layout (`config.json`) ↔ `OwlConfig`.

The released checkpoints carry a `config.json` with three sub-configs (`vision_config`,
`visual_abstractor_config`, `text_config`) and a top-level `num_query_tokens`. `owl_config_from_hf` reads
exactly that layout (`OwlConfig.from_hf_config`); `owl_config_to_hf` writes it back so that the released
PyTorch code can load what we export (`OwlConfig.to_hf_config`). The sub-config readers also take the
standalone HF CLIP and LLaMA configs that `owl-convert init` starts from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from owl_jax.config import AbstractorConfig, ConfigError, OwlConfig, TextConfig, VisionConfig


def owl_config_from_hf(source: str | os.PathLike | dict[str, Any], **runtime: Any) -> OwlConfig:
    """An `OwlConfig` from a released `config.json` (a path, a folder holding one, or the parsed dict);
    `runtime` sets the run-time fields (`dtype`, `param_dtype`, `scan_layers`, ...)."""
    d = read_json_source(source)
    missing = [k for k in ("vision_config", "visual_abstractor_config", "text_config") if k not in d]
    if missing:
        raise ConfigError(
            f"config is not in the MplugOwlConfig layout: missing {missing}; top-level keys are {sorted(d)[:12]}"
        )
    vc, ac, tc = d["vision_config"], d["visual_abstractor_config"], d["text_config"]
    if tc.get("model_type", "llama") != "llama":
        raise ConfigError(
            f"text_config.model_type is {tc.get('model_type')!r}; only LLaMA language models are supported"
        )
    vision = vision_config_from_hf(vc)
    abstractor = AbstractorConfig(
        hidden_size=ac.get("hidden_size", 1024),
        intermediate_size=ac.get("intermediate_size", 2816),
        num_layers=ac.get("num_hidden_layers", 6),
        num_heads=ac.get("num_attention_heads", 16),
        encoder_hidden_size=ac.get("encoder_hidden_size", vision.hidden_size),
        layer_norm_eps=ac.get("layer_norm_eps", 1e-6),
        attention_dropout=ac.get("attention_probs_dropout_prob", 0.1),
    )
    cfg = OwlConfig(
        vision=vision,
        abstractor=abstractor,
        text=text_config_from_hf(tc),
        num_query_tokens=d.get("num_query_tokens", 64),
        **runtime,
    )
    return cfg.validate()


def owl_config_to_hf(cfg: OwlConfig) -> dict[str, Any]:
    """The `MplugOwlConfig` dict the released code reads (`config.json`)."""
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    return {
        "architectures": ["MplugOwlForConditionalGeneration"],
        "model_type": "mplug-owl",
        "num_query_tokens": cfg.num_query_tokens,
        "use_decoder_only_language_model": True,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "vision_config": {
            "model_type": "mplug_owl_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": v.hidden_act,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "projection_dim": 768,
            "use_flash_attn": False,
        },
        "visual_abstractor_config": {
            "model_type": "mplug_owl_visual_abstract",
            "hidden_size": a.hidden_size,
            "intermediate_size": a.intermediate_size,
            "num_hidden_layers": a.num_layers,
            "num_attention_heads": a.num_heads,
            "encoder_hidden_size": a.encoder_hidden_size,
            "layer_norm_eps": a.layer_norm_eps,
            "attention_probs_dropout_prob": a.attention_dropout,
            "initializer_range": 0.02,
        },
        "text_config": {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "hidden_act": t.hidden_act,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.pad_token_id,
            "initializer_range": 0.02,
            "use_cache": True,
        },
    }


def vision_config_from_hf(vc: dict[str, Any]) -> VisionConfig:
    """A vision sub-config: mPLUG-Owl's `vision_config` or an HF `CLIPVisionConfig`."""
    return VisionConfig(
        hidden_size=vc.get("hidden_size", 1024),
        intermediate_size=vc.get("intermediate_size", 4096),
        num_layers=vc.get("num_hidden_layers", 24),
        num_heads=vc.get("num_attention_heads", 16),
        image_size=vc.get("image_size", 224),
        patch_size=vc.get("patch_size", 14),
        num_channels=vc.get("num_channels", 3),
        layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        hidden_act=vc.get("hidden_act", "quick_gelu"),
    )


def text_config_from_hf(tc: dict[str, Any]) -> TextConfig:
    """A LLaMA config (`text_config` of mPLUG-Owl or a `LlamaForCausalLM` config.json)."""
    rope_theta = tc.get("rope_theta")
    rope_params = tc.get("rope_parameters") or {}
    if rope_theta is None:
        rope_theta = rope_params.get("rope_theta", 10000.0)
    scaling = tc.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or rope_params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"rope scaling {rope_type!r} is not supported (mPLUG-Owl uses plain RoPE)")
    heads = tc.get("num_attention_heads", 32)
    if tc.get("attention_bias") or tc.get("mlp_bias"):
        raise ConfigError(
            "LLaMA configs with attention_bias/mlp_bias are not supported (mPLUG-Owl's LLaMA has no biases)"
        )
    if "head_dim" in tc and tc["head_dim"] is not None and tc["head_dim"] != tc.get("hidden_size", 4096) // heads:
        raise ConfigError(f"text head_dim {tc['head_dim']} != hidden_size/num_attention_heads; not supported")
    return TextConfig(
        vocab_size=tc.get("vocab_size", 32000),
        hidden_size=tc.get("hidden_size", 4096),
        intermediate_size=tc.get("intermediate_size", 11008),
        num_layers=tc.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=tc.get("num_key_value_heads") or heads,
        rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position_embeddings=tc.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(tc.get("tie_word_embeddings", False)),
        hidden_act=tc.get("hidden_act", "silu"),
        bos_token_id=_first_id(tc.get("bos_token_id"), 1),
        eos_token_id=_first_id(tc.get("eos_token_id"), 2),
        pad_token_id=_first_id(tc.get("pad_token_id"), 0),
    )


def _first_id(value: int | Sequence[int] | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0])
    return int(value)


def read_json_source(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
