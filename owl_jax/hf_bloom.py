"""BLOOM's HF config ↔ `TextConfig`: the `text_config` of mPLUG-Owl's BLOOMZ layout (`mplug-owl-bloomz-7b-
multilingual`) and the `config.json` of an HF `BloomForCausalLM`.

BLOOM's config names its sizes `hidden_size` (older files: `n_embed`), `n_layer` and `n_head` (transformers
also accepts `num_hidden_layers` and `num_attention_heads`, its attribute-map names); the MLP is always
4 × hidden wide and the head is tied to the embeddings unless `tie_word_embeddings` is false. The port
computes the plain pre-LN block: `apply_residual_connection_post_layernorm`, `pretraining_tp` other than 1
and `slow_but_exact` are refused.

The released BLOOMZ `config.json` also carries the *strings* `"n_layer"` and `"n_head"` as its top-level
`num_hidden_layers` and `num_attention_heads` (its config class copies the attribute-map names instead of
values): `without_attribute_map_names` drops them.
"""

from __future__ import annotations

from typing import Any

from owl_jax.config import ConfigError, TextConfig
from owl_jax.hf_config import MAX_LAYERS, Fields

# HF `BloomConfig` defaults, for keys a config.json leaves out.
_DEFAULTS = dict(vocab_size=250880, hidden_size=64, n_layer=2, n_head=8, layer_norm_epsilon=1e-5)
# (key, its one supported value, why): anything else computes another function than the port.
_FIXED = (
    ("apply_residual_connection_post_layernorm", False, "residuals from the LayerNorm output are not supported"),
    ("slow_but_exact", False, "the sliced dense products of slow_but_exact are not supported"),
)


def _key(d: dict[str, Any], name: str, alias: str) -> str:
    """`name` unless the dict spells the field `alias` only."""
    return alias if name not in d and alias in d else name


def bloom_text_config_from_hf(tc: dict[str, Any], *, where: str = "config.json", prefix: str = "") -> TextConfig:
    """A BLOOM `text_config` (or `BloomForCausalLM` config.json) → `TextConfig(model_type="bloom")`; a bad or
    unsupported field raises a one-line `ConfigError` naming `where` and `prefix` + the key."""
    t = Fields(tc, where, prefix)
    if tc.get("model_type", "bloom") != "bloom":
        raise ConfigError(f"{where}: {prefix}model_type {tc.get('model_type')!r} is not 'bloom'")
    hidden_key = _key(tc, "hidden_size", "n_embed")
    layers_key = _key(tc, "n_layer", "num_hidden_layers")
    heads_key = _key(tc, "n_head", "num_attention_heads")
    hidden = t.size(hidden_key, _DEFAULTS["hidden_size"])
    heads = t.size(heads_key, _DEFAULTS["n_head"])
    t.divisible(hidden_key, hidden, heads_key, heads)
    for key, wanted, why in _FIXED:
        if t.flag(key, wanted) != wanted:
            raise t.fail(key, f"{str(wanted).lower()} ({why})", tc[key])
    if t.size("pretraining_tp", 1) != 1:
        raise t.fail(
            "pretraining_tp", "1 (the sliced products of pretraining_tp > 1 are not supported)", tc["pretraining_tp"]
        )
    eos = t.token_id("eos_token_id", 2)
    return TextConfig(
        model_type="bloom",
        vocab_size=t.size("vocab_size", _DEFAULTS["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=t.size(layers_key, _DEFAULTS["n_layer"], limit=MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=heads,
        layer_norm_eps=t.positive("layer_norm_epsilon", _DEFAULTS["layer_norm_epsilon"]),
        tie_word_embeddings=t.flag("tie_word_embeddings", True),
        hidden_act="bloom_gelu",
        bos_token_id=t.token_id("bos_token_id", 1),
        eos_token_id=eos,
        pad_token_id=t.token_id("pad_token_id", eos),  # unset: generation pads with EOS
    )


def bloom_text_config_to_hf(t: TextConfig) -> dict[str, Any]:
    """The `text_config` dict of the released BLOOMZ layout for a BLOOM `TextConfig`."""
    return {
        "model_type": "bloom",
        "architectures": ["BloomForCausalLM"],
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "n_layer": t.num_layers,
        "n_head": t.num_heads,
        "layer_norm_epsilon": t.layer_norm_eps,
        "apply_residual_connection_post_layernorm": False,
        "pretraining_tp": 1,
        "slow_but_exact": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def without_attribute_map_names(d: dict[str, Any]) -> dict[str, Any]:
    """A released BLOOMZ `config.json` dict without its top-level `num_hidden_layers: "n_layer"` and
    `num_attention_heads: "n_head"` strings (a new dict; numbers there are kept)."""
    return {
        k: v for k, v in d.items() if not (k in ("num_hidden_layers", "num_attention_heads") and isinstance(v, str))
    }
