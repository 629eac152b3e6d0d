"""Float32 parity of the BLOOM text tower with the released PyTorch model (the BLOOMZ reference fixture)."""

import warnings

import numpy as np
import pytest

from helpers import bloomz_loss_mask, bloomz_real_positions, bloomz_reference, load_bloomz_model
from owl_jax.modeling import BloomModel, masked_next_token_loss

ATOL = 1e-4
LOGITS_ATOL = 3e-4  # logits reach ±19.5 here; the released float32 numbers are themselves ~1.6e-4 from float64
LOSS_ATOL = 1e-5


def _max_diff(ours, theirs, where=None) -> float:
    diff = np.abs(np.asarray(ours, np.float64) - theirs)
    return float(diff[where].max() if where is not None else diff.max())


@pytest.mark.parametrize("folder", ["checkpoint", "checkpoint-sharded"])
def test_float32_parity(folder):
    ref = bloomz_reference()
    model = load_bloomz_model(folder)
    assert isinstance(model.language_model, BloomModel) and model.language_model.lm_head is None  # tied head
    px, ids, mask = ref["pixel_values"], ref["input_ids"], ref["attention_mask"]
    assert _max_diff(model.vision_features(px), ref["vision_last_hidden_state"]) < ATOL
    images = model.encode_images(px)
    assert _max_diff(images, ref["abstractor_output"]) < ATOL
    # text normalised by word_embeddings_layernorm, the spliced image vectors as the abstractor gave them
    assert _max_diff(model.embed_inputs(ids, images), ref["inputs_embeds"]) < ATOL
    logits = model(px, ids, mask)
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    assert _max_diff(logits, ref["logits"], bloomz_real_positions()) < LOGITS_ATOL
    loss = masked_next_token_loss(logits, ids, bloomz_loss_mask())
    assert abs(float(loss) - float(ref["loss"])) < LOSS_ATOL


@pytest.mark.parametrize("lora", ["lora-adapter", "lora-trainer-checkpoint"])
@pytest.mark.parametrize("merge", [False, True])
def test_lora_parity_on_the_fused_qkv(lora, merge):
    ref = bloomz_reference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the trainer checkpoint's assumed alpha/r = 4 (right here)
        model = load_bloomz_model("checkpoint-sharded", lora=lora, merge_lora=merge)
    qkv = model.language_model.layers.query_key_value
    assert (qkv.lora_a is not None) != merge
    if not merge:
        assert qkv.lora_b[...].shape == (2, 4, 3 * 96)  # (layers, r, fused [head, (q, k, v), head_dim] outputs)
    logits = model(ref["pixel_values"], ref["input_ids"], ref["attention_mask"])
    assert _max_diff(logits, ref["lora_logits"], bloomz_real_positions()) < LOGITS_ATOL
    loss = masked_next_token_loss(logits, ref["input_ids"], bloomz_loss_mask())
    assert abs(float(loss) - float(ref["lora_loss"])) < LOSS_ATOL
    assert np.abs(ref["lora_logits"] - ref["logits"]).max() > 100 * ATOL  # the adapter really changes the output
