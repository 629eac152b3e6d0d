"""Float32 parity with the released PyTorch video model (`mplug-owl-llama-7b-video` layout) on its fixture."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import VIDEO_FIXTURE, load_fixture_model
from owl_jax.modeling import masked_next_token_loss

ATOL = 1e-4
LOSS_ATOL = 1e-5


def video_model(folder: str = "checkpoint", lora: str | None = None, merge_lora: bool = False):
    """The video fixture's model, loaded once per argument set (tests must not modify it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*no adapter_config.json", UserWarning)  # the trainer checkpoint's alpha
        return load_fixture_model(
            str(VIDEO_FIXTURE / folder), lora=None if lora is None else str(VIDEO_FIXTURE / lora), merge_lora=merge_lora
        )


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(VIDEO_FIXTURE / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def video_loss_mask(ref) -> np.ndarray:
    return ref["non_padding_mask"] * ref["non_media_mask"] * ref["prompt_mask"]


def inputs(ref) -> tuple:
    return ref["pixel_values"], ref["input_ids"], ref["attention_mask"], ref["video_pixel_values"]


def assert_real_positions_close(logits, expected, attention_mask) -> None:
    """Logits at real tokens (at padding, the released `generate` gives LLaMA other positions)."""
    real = np.asarray(attention_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("folder", ["checkpoint", "checkpoint-sharded"])
def test_float32_parity(folder, ref, video_loss_mask):
    model = video_model(folder)
    assert model.config.video and model.config.abstractor.intermediate_size == 256
    images, videos = ref["pixel_values"], ref["video_pixel_values"]
    np.testing.assert_allclose(model.vision_features(images), ref["vision_last_hidden_state"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(model.encode_images(images), ref["abstractor_output"], atol=ATOL, rtol=0)
    features = model.vision_features(videos)
    assert features.shape == (3, 4, 257, 64)
    np.testing.assert_allclose(features, ref["video_vision_last_hidden_state"], atol=ATOL, rtol=0)
    video_embeds = model.encode_videos(videos)
    np.testing.assert_allclose(video_embeds, ref["video_abstractor_output"], atol=ATOL, rtol=0)
    embeds = model.embed_inputs(ref["input_ids"], model.encode_images(images), video_embeds=video_embeds)
    np.testing.assert_allclose(embeds, ref["inputs_embeds"], atol=ATOL, rtol=0)
    logits = model(*inputs(ref))
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    assert_real_positions_close(logits, ref["logits"], ref["attention_mask"])
    loss = masked_next_token_loss(logits, ref["input_ids"], video_loss_mask)
    assert abs(float(loss) - float(ref["loss"])) < LOSS_ATOL


def test_embeddings_and_first_temporal_module(ref):
    """Video 0's frames through the embeddings, then layer 0's temporal module (class rows unchanged)."""
    model = video_model()
    frames = jnp.asarray(ref["video_pixel_values"][0].transpose(1, 0, 2, 3))  # (T, C, H, W)
    np.testing.assert_allclose(model.vision_model.embed(frames), ref["video0_embeddings"], atol=ATOL, rtol=0)
    graphdef, stacked = nnx.split(model.vision_model.layers.temporal)
    layer0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
    out = layer0(jnp.asarray(ref["video0_embeddings"])[None])[0]
    np.testing.assert_allclose(out, ref["video0_layer0_temporal"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(out[:, 0], ref["video0_embeddings"][:, 0])


@pytest.mark.parametrize("lora", ["lora-adapter", "lora-trainer-checkpoint"])
@pytest.mark.parametrize("merge", [False, True])
def test_lora_parity(lora, merge, ref, video_loss_mask):
    model = video_model("checkpoint-sharded", lora=lora, merge_lora=merge)
    assert (model.language_model.layers.q_proj.lora_a is not None) != merge
    logits = model(*inputs(ref))
    assert_real_positions_close(logits, ref["lora_logits"], ref["attention_mask"])
    loss = masked_next_token_loss(logits, ref["input_ids"], video_loss_mask)
    assert abs(float(loss) - float(ref["lora_loss"])) < LOSS_ATOL


def test_a_second_video_in_a_prompt_gets_its_own_features(ref):
    """Each -2 run takes the next video (the released `generate` would repeat the first one's features)."""
    model = video_model()
    ids, videos = ref["input_ids"][:1], ref["video_pixel_values"]
    run = np.flatnonzero(ids[0] == -2)
    both = np.concatenate([ids[:, : run[-1] + 1], [[943]], ids[:, run], ids[:, run[-1] + 1 :]], axis=1)
    embeds = np.asarray(model.embed_inputs(both, None, video_embeds=model.encode_videos(videos)))
    second = run[-1] + 2 + np.arange(len(run))
    np.testing.assert_allclose(embeds[0, run], ref["video_abstractor_output"][0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(embeds[0, second], ref["video_abstractor_output"][1], atol=ATOL, rtol=0)


def test_video_input_errors(ref):
    model = video_model()
    one_frame = ref["video_pixel_values"][:, :, :1]
    with pytest.raises(ValueError, match=r"at least 2 frames"):
        model.vision_features(one_frame)
    with pytest.raises(ValueError, match=r"at least 2 frames"):
        model.encode_videos(one_frame)
    with pytest.raises(ValueError, match="3 video placeholder runs but video_pixel_values has 2 videos"):
        model(ref["pixel_values"], ref["input_ids"], ref["attention_mask"], ref["video_pixel_values"][:2])
    with pytest.raises(ValueError, match="3 video placeholder runs but video_pixel_values has 0 videos"):
        model(ref["pixel_values"], ref["input_ids"], ref["attention_mask"])
    adjacent = np.concatenate([ref["input_ids"][:1, :43], np.full((1, 9), -2), ref["input_ids"][:1, 43:]], axis=1)
    with pytest.raises(ValueError, match="run of 18 video placeholders at position 34"):
        model(None, adjacent, None, ref["video_pixel_values"][:2])
