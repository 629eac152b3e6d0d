"""The stored form of a quantized kernel: int4 packing, rounding error bounds, scale shapes, the layer's product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from owl_jax.modeling.linear import Linear
from owl_jax.quant import QuantSpec, QuantSpecError, parse_quantize
from owl_jax.quant.arrays import dequantize_kernel, pack_int4, quantize_host, quantize_kernel, unpack_int4
from owl_jax.quant.linear import QuantLinear

pytestmark = pytest.mark.compile_quickly


def test_int4_packing_round_trips_every_value_with_leading_axes():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, size=(3, 10, 5)).astype(np.int8)
    q[0, :2, 0] = [-8, 7]  # the extremes, in one byte
    packed = pack_int4(jnp.asarray(q))
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, 5)
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), q)
    # input 2k in the low nibble, 2k + 1 in the high one (two's complement)
    assert int(packed[0, 0, 0]) == (-8 & 0xF) | ((7 & 0xF) << 4)


@pytest.mark.parametrize("mode, levels", [("int8", 127.5), ("int4", 7.5)])
def test_rounding_error_is_at_most_half_a_step_of_each_scale(mode, levels):
    spec = QuantSpec(mode=mode, group_size=8)
    w = np.random.default_rng(1).normal(size=(2, 32, 6)).astype(np.float32)
    w[1, :, 2] = 0.0  # an all-zero channel keeps a usable scale
    qvalue, qscale = quantize_kernel(w, spec)
    group = 32 if mode == "int8" else 8
    assert qscale.shape == (2, 32 // group, 6) and qscale.dtype == jnp.float32
    assert qvalue.shape == ((2, 32, 6) if mode == "int8" else (2, 16, 6))
    # the scale maps each channel's (or group's) largest magnitude to the end of the integer range
    absmax = np.abs(w.reshape(2, 32 // group, group, 6)).max(axis=2)
    expected = np.where(absmax > 0, absmax / levels, 1.0)
    np.testing.assert_allclose(np.asarray(qscale), expected, rtol=1e-6)
    back = np.asarray(dequantize_kernel(qvalue, qscale, spec, jnp.float32))
    step = np.repeat(np.asarray(qscale), group, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 * 1.0001 + 1e-7)  # (the largest rounds to the last level)
    assert np.all(back[1, :, 2] == 0)


def test_host_quantization_slice_by_slice_equals_the_whole_stack():
    spec = QuantSpec(mode="int4", group_size=16)
    w = np.random.default_rng(2).normal(size=(3, 48, 10)).astype(np.float32)
    q, s = quantize_host(w.astype(jnp.bfloat16), spec)
    q_all, s_all = quantize_kernel(w.astype(jnp.bfloat16), spec)
    np.testing.assert_array_equal(q, np.asarray(q_all))
    np.testing.assert_array_equal(s, np.asarray(s_all))


def test_group_size_falls_back_to_a_divisor_and_specs_are_checked():
    spec = QuantSpec(mode="int4")  # group 128
    assert spec.group_for(96) == 96 and spec.group_for(256) == 128 and spec.group_for(11008) == 128
    assert QuantSpec(mode="int4", group_size=64).group_for(96) == 48
    assert QuantSpec(mode="int8").group_for(96) == 96
    assert parse_quantize(None) is None and parse_quantize("int4") == QuantSpec(mode="int4")
    assert parse_quantize({"mode": "int8", "include_vision": True}).include_vision
    with pytest.raises(QuantSpecError, match="int3"):
        parse_quantize("int3")
    with pytest.raises(QuantSpecError, match="group_size"):
        QuantSpec(mode="int4", group_size=3).validate()
    with pytest.raises(QuantSpecError, match="unknown fields"):
        QuantSpec.from_dict({"mode": "int8", "bits": 8})


def test_selection_keeps_the_head_and_other_towers_float_by_default():
    spec = QuantSpec()
    assert spec.selects(("language_model", "layers", "q_proj"))
    assert not spec.selects(("language_model", "lm_head"))
    assert not spec.selects(("vision_model", "layers", "fc1"))
    assert not spec.selects(("abstractor", "layers", "w1"))
    wide = QuantSpec(include_vision=True, lm_head=True)
    assert wide.selects(("language_model", "lm_head")) and wide.selects(("vision_model", "layers", "fc1"))
    assert not wide.selects(("abstractor", "layers", "w1"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quant_linear_multiplies_by_the_dequantized_kernel(mode, dtype):
    """Against numpy: x @ (integers × scales) + b + the adapter's product, from the stored arrays."""
    from owl_jax.config import LoRAConfig

    lora = LoRAConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=("proj",))
    layer = Linear(32, 12, axes=("embed", "mlp"), hf_name="proj", rngs=nnx.Rngs(0), lora=lora, dtype=dtype)
    layer.bias[...] = jnp.linspace(-1, 1, 12)
    layer.lora_b[...] = jax.random.normal(jax.random.key(3), (2, 12)) * 0.1
    spec = QuantSpec(mode=mode, group_size=8)
    quant = QuantLinear.from_linear(layer, spec)
    held = {str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(quant, nnx.Param))}
    assert held == {"qvalue", "qscale", "bias", "lora_a", "lora_b"}  # no float kernel kept
    x = np.random.default_rng(4).normal(size=(2, 3, 32)).astype(np.float32)
    q = np.asarray(unpack_int4(quant.qvalue[...]) if mode == "int4" else quant.qvalue[...], np.float32)
    group = 32 if mode == "int8" else 8
    w = q * np.repeat(np.asarray(quant.qscale[...]), group, axis=0)
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    expected = x @ w + np.asarray(layer.bias[...]) + 2.0 * (x @ a) @ b
    got = np.asarray(quant(jnp.asarray(x), float32_output=True))
    tol = 1e-4 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(got, expected, atol=tol * np.abs(expected).max(), rtol=0)
    # and the product is the float layer's within the rounding of the weights
    float_out = np.asarray(layer(jnp.asarray(x), float32_output=True))
    bound = {"int8": 0.02, "int4": 0.25}[mode]
    assert np.linalg.norm(got - float_out) / np.linalg.norm(float_out) < bound


def test_adapters_get_gradients_and_the_quantized_kernel_none():
    from owl_jax.config import LoRAConfig

    lora = LoRAConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=("p",))
    layer = Linear(16, 8, axes=("embed", "mlp"), hf_name="p", rngs=nnx.Rngs(0), use_bias=False, lora=lora)
    quant = QuantLinear.from_linear(layer, QuantSpec(mode="int4", group_size=8))
    graphdef, adapters, scales, rest = nnx.split(quant, nnx.LoRAParam, nnx.PathContains("qscale"), ...)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16)), jnp.float32)
    loss = lambda a, s: jnp.sum(nnx.merge(graphdef, a, s, rest)(x) ** 2)  # noqa: E731
    g_adapters, g_scales = jax.grad(loss, argnums=(0, 1))(adapters, scales)
    assert np.abs(np.asarray(g_adapters["lora_b"][...])).max() > 0
    assert np.all(np.asarray(g_scales["qscale"][...]) == 0)
