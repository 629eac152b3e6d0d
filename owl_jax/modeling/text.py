"""The language model f_L a config names (`TextConfig.model_type`): LLaMA or BLOOM.

Both take the same calls: `embed(ids)` (text embeddings, before images are spliced in), `__call__(embeds,
positions, mask, cache=..., ...)` → `(hidden, cache)`, `logits(hidden)`, and the same `KVCache`.
"""

from __future__ import annotations

from typing import Any

from owl_jax.config import ConfigError, TextConfig
from owl_jax.modeling.bloom import BloomModel
from owl_jax.modeling.llama import LlamaModel

TextModel = LlamaModel | BloomModel
TEXT_MODELS: dict[str, type[TextModel]] = {"llama": LlamaModel, "bloom": BloomModel}


def text_model(cfg: TextConfig, **run: Any) -> TextModel:
    """The `language_model` of `Owl` for `cfg` (`run`: lora, dtypes, scan/remat, numerics, rngs)."""
    if cfg.model_type not in TEXT_MODELS:
        raise ConfigError(f"text model_type {cfg.model_type!r} is not one of {tuple(TEXT_MODELS)}")
    return TEXT_MODELS[cfg.model_type](cfg, **run)
