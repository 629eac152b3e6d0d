"""The reference fixture quantized at load: what the model holds, its forward pass, its greedy tokens.

Tolerances (docs/quantization.md): the fixture's weights are random N(0, 0.08), which quantize worse than
trained ones. Measured on it: relative L2 error of the logits 2.3% (int8) and 35% (int4); teacher-forced
top-1 agreement with the float greedy tokens 11/12 on both prompts (int8). The bounds below leave room.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import owl_jax
from helpers import FIXTURE, load_fixture_model
from owl_jax.checkpoint import abstract_model, assemble, host_leaves
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.quant import linear_bytes, param_bytes
from owl_jax.quant.arrays import dequantize_kernel

pytestmark = pytest.mark.compile_quickly  # every comparison is between results compiled alike

MODES = ["int8", "int4"]
BYTES_BOUND = {"int8": 0.55, "int4": 0.28}  # held bytes of the quantized layers / their bf16 kernels
LOGIT_BOUND = {"int8": 0.05, "int4": 0.5}  # relative L2 error of the logits against the float model


@pytest.fixture(scope="module")
def quantized():
    return {
        mode: owl_jax.from_pretrained(FIXTURE / "checkpoint", quantize=mode, show_progress=False)[0] for mode in MODES
    }


def _logits(model, reference):
    return np.asarray(model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"]))


@pytest.mark.parametrize("mode", MODES)
def test_the_model_holds_integers_and_scales_not_float_kernels(quantized, mode):
    model = quantized[mode]
    flat = {tuple(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    llm_kernels = sorted("/".join(p) for p in flat if p[0] == "language_model" and p[-1] == "kernel")
    assert llm_kernels == ["language_model/lm_head/kernel"]  # the head stays float by default
    qvalues = [v for p, v in flat.items() if p[-1] == "qvalue"]
    assert len(qvalues) == 7 and {v.dtype for v in qvalues} == {jnp.dtype("int8" if mode == "int8" else "uint8")}
    assert all(p[0] == "language_model" for p in flat if p[-1] == "qvalue")  # ViT and abstractor stay float
    size = linear_bytes(model)
    assert size["quantized"] <= BYTES_BOUND[mode] * size["quantized_bf16"]
    # Every byte accounted for: the language model holds the float model's bytes less the float32 kernels
    # (twice their bf16 bytes) plus the integers and scales, so no float copy of a kernel is kept anywhere.
    float_llm = param_bytes(load_fixture_model())["language_model"]
    assert param_bytes(model)["language_model"] == float_llm - 2 * size["quantized_bf16"] + size["quantized"]


@pytest.mark.parametrize("mode", MODES)
def test_logits_are_the_float_models_with_the_dequantized_kernels(quantized, reference, mode):
    """The quantized forward against the float model filled with the dequantized weights (computed apart)."""
    model = quantized[mode]
    leaves = host_leaves(load_fixture_model())
    for path, node in nnx.iter_graph(model):
        if hasattr(node, "qvalue"):
            module = tuple(map(str, path))
            kernel = dequantize_kernel(node.qvalue[...], node.qscale[...], node.spec, jnp.float32)
            assert leaves[module + ("kernel",)].shape == kernel.shape
            leaves[module + ("kernel",)] = np.asarray(kernel)
    graphdef, abstract = abstract_model(load_fixture_model().config)
    dequantized = assemble(graphdef, abstract, leaves)
    got = _logits(model, reference)
    np.testing.assert_allclose(got, _logits(dequantized, reference), atol=2e-5, rtol=0)
    # and close to the float model's, within the documented tolerance
    float_logits = _logits(load_fixture_model(), reference)
    real = reference["attention_mask"].astype(bool)
    error = np.linalg.norm((got - float_logits)[real]) / np.linalg.norm(float_logits[real])
    assert 0 < error < LOGIT_BOUND[mode]


def test_int8_greedy_tokens_agree_with_the_float_model(quantized, reference):
    """Teacher-forced on the float model's greedy tokens (the fixture's `greedy_0/1`), the int8 model picks
    the same token at most steps; its own greedy decode (unstacked layers, whose q/k/v fusion is skipped for
    quantized kernels) picks what its forward pass says, and starts as the float model does."""
    model = quantized["int8"]
    ids, mask, pixels = reference["input_ids"], reference["attention_mask"], reference["pixel_values"]
    generator = Generator(model, unstack_layers=True)
    assert generator.state[2] is None  # no fused projections over quantized kernels
    out = generator.generate(ids[:2], mask[:2], pixels[:3], GenerationConfig(max_new_tokens=12, min_new_tokens=12))
    lengths = [int(mask[row].sum()) for row in (0, 1)]
    float_greedy = [reference[f"greedy_{row}"][1:] for row in (0, 1)]
    own = [np.asarray(t) for t in out.tokens]
    # one teacher-forced pass over four right-padded rows: each prompt + the float tokens, + its own tokens
    rows = [np.concatenate([ids[r, : lengths[r]], t]) for t, r in zip(float_greedy + own, (0, 1, 0, 1))]
    width = max(len(r) for r in rows)
    batch = np.stack([np.pad(r, (0, width - len(r)), constant_values=2) for r in rows])
    batch_mask = (np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
    images = np.concatenate([pixels[:1], pixels[1:3], pixels[:1], pixels[1:3]])
    logits = np.asarray(model(images, batch, batch_mask))
    picks = [logits[i, lengths[i % 2] - 1 : lengths[i % 2] - 1 + 12] for i in range(4)]
    for row in (0, 1):
        assert (picks[row].argmax(-1) == float_greedy[row]).mean() >= 8 / 12
        own_logits = picks[2 + row].copy()
        own_logits[:, 2] = -np.inf  # min_new_tokens keeps EOS (id 2) out of the 12 picks
        np.testing.assert_array_equal(own_logits.argmax(-1), own[row])
        assert own[row][:3].tolist() == float_greedy[row][:3].tolist()
