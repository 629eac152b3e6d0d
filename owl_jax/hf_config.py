"""The released `MplugOwlConfig` layout (`config.json`) ↔ `OwlConfig`.

The released checkpoints carry a `config.json` with three sub-configs (`vision_config`,
`visual_abstractor_config`, `text_config`) and a top-level `num_query_tokens`. `owl_config_from_hf` reads
exactly that layout (`OwlConfig.from_hf_config`); `owl_config_to_hf` writes it back so that the released
PyTorch code can load what we export (`OwlConfig.to_hf_config`). The sub-config readers also take the
standalone HF CLIP and LLaMA configs that `owl-convert init` starts from. The video layout's differences
(`OwlConfig.video`) are in `owl_jax.hf_video_layout`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from owl_jax import hf_video_layout
from owl_jax.config import AbstractorConfig, ConfigError, OwlConfig, TextConfig, VisionConfig


def owl_config_from_hf(
    source: str | os.PathLike | dict[str, Any], *, where: str | None = None, **runtime: Any
) -> OwlConfig:
    """An `OwlConfig` from a released `config.json` (a path, a folder holding one, or the parsed dict);
    `runtime` sets the run-time fields (`dtype`, `param_dtype`, `scan_layers`, ...).

    Every field read is checked (type, range, divisibility) before any model is built: a bad one raises a
    one-line `ConfigError` naming `where` (default: the file's path, or "config.json" for a dict) and the key,
    e.g. `config.json: text_config.num_attention_heads must be a positive integer, got 0`.
    """
    where = where or where_of(source)
    d = read_json_source(source)
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must hold a JSON object, got {_show(d)}")
    missing = [k for k in ("vision_config", "visual_abstractor_config", "text_config") if k not in d]
    if missing:
        raise ConfigError(
            f"{where} is not in the MplugOwlConfig layout: missing {missing}; top-level keys are {sorted(d)[:12]}"
        )
    top = Fields(d, where)
    vc, ac, tc = top.section("vision_config"), top.section("visual_abstractor_config"), top.section("text_config")
    text_type = tc.get("model_type", "llama")
    if text_type not in ("llama", "bloom"):
        raise ConfigError(
            f"{where}: text_config.model_type is {text_type!r}; only LLaMA and BLOOM language models are supported"
        )
    read_text = text_config_from_hf
    if text_type == "bloom":  # hf_bloom reads with this module's `Fields`, so it is imported here
        from owl_jax import hf_bloom

        d = hf_bloom.without_attribute_map_names(d)  # its top-level "n_layer"/"n_head" strings
        read_text = hf_bloom.bloom_text_config_from_hf
    vision = vision_config_from_hf(vc, where=where, prefix="vision_config.")
    a = Fields(ac, where, "visual_abstractor_config.")
    abstractor = AbstractorConfig(
        hidden_size=a.size("hidden_size", 1024),
        intermediate_size=a.size("intermediate_size", 2816),
        num_layers=a.size("num_hidden_layers", 6, limit=MAX_LAYERS),
        num_heads=a.size("num_attention_heads", 16),
        encoder_hidden_size=a.size("encoder_hidden_size", vision.hidden_size),
        layer_norm_eps=a.positive("layer_norm_eps", 1e-6),
        attention_dropout=a.probability("attention_probs_dropout_prob", 0.1),
    )
    a.divisible("hidden_size", abstractor.hidden_size, "num_attention_heads", abstractor.num_heads)
    video = hf_video_layout.is_video_layout(d, where)
    if video:  # the video package widens the SwiGLU (`owl_jax.hf_video_layout`)
        width = hf_video_layout.video_swiglu_width(abstractor.intermediate_size)
        abstractor = dataclasses.replace(abstractor, intermediate_size=width)
    cfg = OwlConfig(
        vision=vision,
        abstractor=abstractor,
        text=read_text(tc, where=where, prefix="text_config."),
        num_query_tokens=top.size("num_query_tokens", 64),
        video=video,
        **runtime,
    )
    try:
        return cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def owl_config_to_hf(cfg: OwlConfig) -> dict[str, Any]:
    """The `MplugOwlConfig` dict the released code reads (`config.json`); the video layout's with `cfg.video`."""
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    out = {
        "architectures": ["MplugOwlForConditionalGeneration"],
        "model_type": "mplug-owl",
        "num_query_tokens": cfg.num_query_tokens,
        "use_decoder_only_language_model": True,
        "tie_word_embeddings": t.tie_word_embeddings,
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
        "text_config": _bloom_text_config_to_hf(t)
        if t.model_type == "bloom"
        else {
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
    return hf_video_layout.to_video_layout(out, a.intermediate_size) if cfg.video else out


def _bloom_text_config_to_hf(t: TextConfig) -> dict[str, Any]:
    from owl_jax import hf_bloom  # it reads with this module's `Fields`, so it is imported here

    return hf_bloom.bloom_text_config_to_hf(t)


def vision_config_from_hf(vc: dict[str, Any], *, where: str = "config.json", prefix: str = "") -> VisionConfig:
    """A vision sub-config: mPLUG-Owl's `vision_config` or an HF `CLIPVisionConfig`; a bad field raises a
    `ConfigError` naming `where` and `prefix` + the key."""
    v = Fields(vc, where, prefix)
    cfg = VisionConfig(
        hidden_size=v.size("hidden_size", 1024),
        intermediate_size=v.size("intermediate_size", 4096),
        num_layers=v.size("num_hidden_layers", 24, limit=MAX_LAYERS),
        num_heads=v.size("num_attention_heads", 16),
        image_size=v.size("image_size", 224, limit=MAX_IMAGE_SIZE),
        patch_size=v.size("patch_size", 14, limit=MAX_IMAGE_SIZE),
        num_channels=v.size("num_channels", 3, limit=MAX_CHANNELS),
        layer_norm_eps=v.positive("layer_norm_eps", 1e-6),
        hidden_act=v.text("hidden_act", "quick_gelu"),
    )
    v.divisible("hidden_size", cfg.hidden_size, "num_attention_heads", cfg.num_heads)
    v.divisible("image_size", cfg.image_size, "patch_size", cfg.patch_size)
    return cfg


def text_config_from_hf(tc: dict[str, Any], *, where: str = "config.json", prefix: str = "") -> TextConfig:
    """A LLaMA config (`text_config` of mPLUG-Owl or a `LlamaForCausalLM` config.json); a bad field raises a
    `ConfigError` naming `where` and `prefix` + the key."""
    t = Fields(tc, where, prefix)
    rope_params = t.optional_section("rope_parameters")
    rope_theta = t.positive("rope_theta", None)
    if rope_theta is None:
        rope_theta = Fields(rope_params, where, prefix + "rope_parameters.").positive("rope_theta", 10000.0)
    scaling = t.optional_section("rope_scaling")
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope_params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"{where}: rope scaling {rope_type!r} is not supported (mPLUG-Owl uses plain RoPE)")
    if tc.get("attention_bias") or tc.get("mlp_bias"):
        raise ConfigError(
            f"{where}: LLaMA configs with attention_bias/mlp_bias are not supported (mPLUG-Owl's LLaMA has no biases)"
        )
    hidden = t.size("hidden_size", 4096)
    heads = t.size("num_attention_heads", 32)
    kv_heads = t.size("num_key_value_heads", None)
    t.divisible("hidden_size", hidden, "num_attention_heads", heads)
    head_dim = t.size("head_dim", None)
    if head_dim is not None and head_dim != hidden // heads:
        raise ConfigError(
            f"{where}: {prefix}head_dim {head_dim} != hidden_size/num_attention_heads = {hidden // heads}; "
            "not supported"
        )
    if kv_heads is not None:
        t.divisible("num_attention_heads", heads, "num_key_value_heads", kv_heads)
    return TextConfig(
        vocab_size=t.size("vocab_size", 32000),
        hidden_size=hidden,
        intermediate_size=t.size("intermediate_size", 11008),
        num_layers=t.size("num_hidden_layers", 32, limit=MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=kv_heads or heads,
        rms_norm_eps=t.positive("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        max_position_embeddings=t.size("max_position_embeddings", 2048, limit=2**31 - 1),
        tie_word_embeddings=t.flag("tie_word_embeddings", False),
        hidden_act=t.text("hidden_act", "silu"),
        bos_token_id=t.token_id("bos_token_id", 1),
        eos_token_id=t.token_id("eos_token_id", 2),
        pad_token_id=t.token_id("pad_token_id", 0),
    )


# Bounds no real checkpoint comes near; beyond them a hostile config would make the converter enumerate
# billions of keys or overflow shape arithmetic before any weight is looked at.
MAX_SIZE = 2**24
MAX_LAYERS = 4096
MAX_IMAGE_SIZE = 2**16
MAX_CHANNELS = 64


def _show(value: Any) -> str:
    """`value` as config.json spells it (shortened)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed reads of one (sub-)config dict: a missing key gives its default, a present one must have the
    right type and range, or a one-line `ConfigError` names `where` and `prefix` + the key."""

    def __init__(self, d: dict[str, Any], where: str, prefix: str = ""):
        self.d, self.where, self.prefix = d, where, prefix

    def get(self, key: str, default: Any = None) -> Any:
        return self.d.get(key, default)

    def fail(self, key: str, what: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{key} must be {what}, got {_show(value)}")

    def section(self, key: str) -> dict[str, Any]:
        value = self.d.get(key)
        if not isinstance(value, dict):
            raise self.fail(key, "an object", value)
        return value

    def optional_section(self, key: str) -> dict[str, Any]:
        """An object, or {} when missing or null."""
        value = self.d.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "an object or null", value)
        return value

    def size(self, key: str, default: int | None, *, limit: int = MAX_SIZE) -> int | None:
        """A positive integer up to `limit`; a missing key (or, when `default` is None, null) gives `default`."""
        value = self.d.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.fail(key, "a positive integer", value)
        if value > limit:
            raise self.fail(key, f"a positive integer no larger than {limit}", value)
        return value

    def positive(self, key: str, default: float | None) -> float | None:
        """A positive finite number; a missing key (or, when `default` is None, null) gives `default`."""
        value = self.d.get(key, default)
        if value is None and default is None:
            return None
        if not _is_number(value) or not 0 < value < float("inf"):
            raise self.fail(key, "a positive number", value)
        return value

    def probability(self, key: str, default: float) -> float:
        value = self.d.get(key, default)
        if not _is_number(value) or not 0 <= value <= 1:
            raise self.fail(key, "a number from 0 to 1", value)
        return value

    def text(self, key: str, default: str) -> str:
        value = self.d.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.d.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def token_id(self, key: str, default: int) -> int:
        """An integer token id, or a list of them (the first counts); null or missing gives `default`."""
        value = self.d.get(key)
        if value is None:
            return default
        first = value[0] if isinstance(value, list) and value else value
        if not isinstance(first, int) or isinstance(first, bool):
            raise self.fail(key, "an integer token id or a non-empty list of them", value)
        return first

    def divisible(self, key: str, value: int, by_key: str, by: int) -> None:
        if value % by:
            raise ConfigError(
                f"{self.where}: {self.prefix}{key} {value} is not divisible by {self.prefix}{by_key} {by}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def where_of(source: str | os.PathLike | dict[str, Any]) -> str:
    """How errors name the config: its file's path, or "config.json" for a parsed dict."""
    if isinstance(source, dict):
        return "config.json"
    path = os.fspath(source)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_json_source(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The parsed config: `source` itself when a dict, else the JSON object in the file (or in the folder's
    `config.json`); anything but a readable JSON object raises `ConfigError` naming the file."""
    if isinstance(source, dict):
        return source
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON: {_one_line(e)}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {_show(d)}")
    return d


def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()
    return text[0] if text else type(e).__name__
