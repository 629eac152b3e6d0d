"""Weight-only int8 / int4 quantization of mPLUG-Owl's linear layers, through qwix.

    model, processor = owl_jax.from_pretrained("converted", dtype="bfloat16", quantize="int8")
    convert_weights.py import --quantize int4 mplug-owl-llama-7b converted-int4

The modules, one idea each:

    spec          `QuantSpec`: int8 per-channel or int4 per-group, which towers; `parse_quantize`
    arrays        a float kernel ↔ its stored integers (int4 packed two per byte) and scales, via qwix
    linear        `QuantLinear`: the module that holds them and dequantizes in its forward pass
    matmul        `quant_matmul`: the product whose backward pass keeps the integers, not a float kernel
    modules       swapping a model's selected `Linear`s for `QuantLinear`s (`Owl(config)` with `config.quant`)
    leaves        quantizing flat checkpoint leaves one kernel at a time (loading, importing, training)
    load          checkpoint folders quantized as they are read (`load_checkpoint(quantize=...)`)
    random_init   a random model of any size built quantized layer by layer (benchmarks)
    stats         parameter bytes by tower and kind

Names are imported lazily: `owl_jax.config` imports `spec` while the modeling code is still loading.
"""

from __future__ import annotations

import importlib
from typing import Any

from owl_jax.quant.spec import MODES, QUANT_LEAVES, QuantSpec, QuantSpecError, parse_quantize

_LAZY = {
    "QuantLinear": "owl_jax.quant.linear",
    "quantize_kernel": "owl_jax.quant.arrays",
    "dequantize_kernel": "owl_jax.quant.arrays",
    "quant_matmul": "owl_jax.quant.matmul",
    "quantize_linears": "owl_jax.quant.modules",
    "quantized_modules": "owl_jax.quant.modules",
    "quantize_leaves": "owl_jax.quant.leaves",
    "random_model": "owl_jax.quant.random_init",
    "param_bytes": "owl_jax.quant.stats",
    "linear_bytes": "owl_jax.quant.stats",
}

__all__ = ["MODES", "QUANT_LEAVES", "QuantSpec", "QuantSpecError", "parse_quantize", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'owl_jax.quant' has no attribute {name!r}")
