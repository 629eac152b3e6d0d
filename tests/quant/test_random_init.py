"""`random_model`: the benchmarks' leaf-by-leaf random model is the model `Owl(config)` describes."""

import numpy as np
import pytest
from flax import nnx

from helpers import tiny_config
from owl_jax.checkpoint import abstract_model, leaf_shapes
from owl_jax.quant import QuantSpec
from owl_jax.quant.arrays import dequantize_kernel
from owl_jax.quant.random_init import random_model

pytestmark = pytest.mark.compile_quickly


def test_random_model_has_the_configs_leaves_and_plausible_values():
    spec = QuantSpec(mode="int4", group_size=8, include_vision=True)
    cfg = tiny_config(quant=spec, param_dtype="bfloat16")
    model = random_model(cfg, seed=0)
    flat = {tuple(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {p: (tuple(v.shape), v.dtype) for p, v in flat.items()} == leaf_shapes(abstract_model(cfg)[1])
    values = {p: np.asarray(v).astype(np.float32) for p, v in flat.items()}
    assert all(np.all(v == 1) for p, v in values.items() if p[-1] == "scale")  # norms
    assert all(np.all(v == 0) for p, v in values.items() if p[-1] == "bias")
    kernels = [v for p, v in values.items() if p[-1] == "kernel"]
    assert kernels and all(0.5 < v.std() * np.sqrt(v.shape[-2]) < 2 for v in kernels)  # LeCun-normal
    quantized = [p for p in values if p[-1] == "qvalue"]
    assert {p[0] for p in quantized} == {"language_model", "vision_model"}
    assert all(values[p[:-1] + ("qscale",)].min() > 0 for p in quantized)
    # the quantized model holds the quantization of the float model's kernels (same seed, same values)
    float_model = random_model(cfg.replace(quant=None, param_dtype="float32"), seed=0)
    q_proj = model.language_model.layers.q_proj
    back = np.asarray(dequantize_kernel(q_proj.qvalue[...], q_proj.qscale[...], spec, np.float32))
    step = np.repeat(np.asarray(q_proj.qscale[...]), 8, axis=-2)
    assert np.all(np.abs(back - np.asarray(float_model.language_model.layers.q_proj.kernel[...])) <= step / 2 + 1e-6)
