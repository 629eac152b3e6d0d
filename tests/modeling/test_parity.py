"""Float32 parity with the released PyTorch model on the reference fixture."""

import numpy as np
import pytest

from helpers import load_fixture_model
from owl_jax.modeling import masked_next_token_loss

ATOL = 1e-4
LOSS_ATOL = 1e-5


@pytest.mark.parametrize("folder", ["checkpoint", "checkpoint-sharded"])
def test_float32_parity(folder, reference, loss_mask):
    model = load_fixture_model(folder)
    np.testing.assert_allclose(
        model.vision_features(reference["pixel_values"]), reference["vision_last_hidden_state"], atol=ATOL, rtol=0
    )
    np.testing.assert_allclose(
        model.encode_images(reference["pixel_values"]), reference["abstractor_output"], atol=ATOL, rtol=0
    )
    logits = model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"])
    assert logits.dtype == np.float32 and logits.shape == reference["logits"].shape
    np.testing.assert_allclose(logits, reference["logits"], atol=ATOL, rtol=0)
    loss = masked_next_token_loss(logits, reference["input_ids"], loss_mask)
    assert abs(float(loss) - float(reference["loss"])) < LOSS_ATOL


@pytest.mark.parametrize("lora", ["lora-adapter", "lora-trainer-checkpoint"])
@pytest.mark.parametrize("merge", [False, True])
def test_lora_parity(lora, merge, reference, loss_mask):
    with pytest.warns(UserWarning, match="alpha") if lora == "lora-trainer-checkpoint" else _no_warning():
        model = load_fixture_model("checkpoint-sharded", lora=lora, merge_lora=merge)
    has_adapters = model.language_model.layers.q_proj.lora_a is not None
    assert has_adapters != merge
    logits = model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"])
    np.testing.assert_allclose(logits, reference["lora_logits"], atol=ATOL, rtol=0)
    loss = masked_next_token_loss(logits, reference["input_ids"], loss_mask)
    assert abs(float(loss) - float(reference["lora_loss"])) < LOSS_ATOL
    # The adapter really changes the output: the base logits are far from the LoRA ones.
    assert np.abs(reference["lora_logits"] - reference["logits"]).max() > 100 * ATOL


def test_unrolled_layers_equal_scanned(reference):
    scanned = load_fixture_model("checkpoint")
    unrolled = load_fixture_model("checkpoint", scan_layers=False)
    args = (reference["pixel_values"], reference["input_ids"], reference["attention_mask"])
    np.testing.assert_allclose(unrolled(*args), scanned(*args), atol=1e-5, rtol=0)


# bfloat16 compute on the tiny fixture: max |Δlogits| 0.047 and mean 0.007 against float32 PyTorch
# (logits have mean magnitude 0.65); README documents max 0.1 / mean 0.02.
BF16_MAX, BF16_MEAN = 0.1, 0.02


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_bfloat16_compute_within_documented_tolerance(param_dtype, fixture_dir, reference):
    import owl_jax

    model, _ = owl_jax.from_pretrained(
        fixture_dir / "checkpoint", dtype="bfloat16", param_dtype=param_dtype, show_progress=False
    )
    assert model.language_model.layers.q_proj.kernel[...].dtype == np.dtype(param_dtype)
    logits = np.asarray(model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"]))
    assert logits.dtype == np.float32
    diff = np.abs(logits - reference["logits"])
    assert diff.max() < BF16_MAX and diff.mean() < BF16_MEAN
    assert diff.max() > 0  # really computed in bfloat16


def test_text_only_batch_matches_reference_row(reference):
    model = load_fixture_model("checkpoint")
    row = 2  # the text-only prompt
    logits = model(None, reference["input_ids"][row : row + 1], reference["attention_mask"][row : row + 1])
    np.testing.assert_allclose(logits[0], reference["logits"][row], atol=ATOL, rtol=0)


def test_batch_rows_are_independent(reference):
    """Row 1 alone (with its two images) equals row 1 inside the batch."""
    model = load_fixture_model("checkpoint")
    logits = model(reference["pixel_values"][1:3], reference["input_ids"][1:2], reference["attention_mask"][1:2])
    np.testing.assert_allclose(logits[0], reference["logits"][1], atol=ATOL, rtol=0)


class _no_warning:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@pytest.mark.parametrize("impl", ["xla", "jax"])
def test_attention_implementations_match_the_reference(impl, reference):
    """Every implementation that can run here reproduces the released model (the fused cuDNN kernel is
    the same call as "jax" with another backend and runs only on a GPU)."""
    model = load_fixture_model("checkpoint", attention_impl=impl)
    logits = model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"])
    np.testing.assert_allclose(logits, reference["logits"], atol=ATOL, rtol=0)


def test_attention_jax_path_with_grouped_heads_and_masks():
    import jax
    import jax.numpy as jnp

    from owl_jax import ops
    from owl_jax.config import Numerics

    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 5, 6, 8))
    k = jax.random.normal(keys[1], (2, 7, 2, 8))  # 3 query heads per key/value head
    v = jax.random.normal(keys[2], (2, 7, 2, 8))
    mask = jnp.tril(jnp.ones((5, 7), bool), k=2)[None] & (jnp.arange(7) < jnp.array([[7], [4]]))[:, None, :]
    ref = ops.attention(q, k, v, scale=8**-0.5, mask=mask, numerics=Numerics(attention="xla"))
    out = ops.attention(q, k, v, scale=8**-0.5, mask=mask, numerics=Numerics(attention="jax"))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert ops.attention(q, k, v, scale=1.0, numerics=Numerics(attention="auto")).shape == q.shape  # xla off a GPU
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            ops.attention(q, k, v, scale=1.0, numerics=Numerics(attention="cudnn"))
    with pytest.raises(ValueError, match="not one of"):
        ops.attention(q, k, v, scale=1.0, numerics=Numerics(attention="flash"))
