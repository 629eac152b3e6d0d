"""OwlProcessor in the video layout against the released video processor's outputs (the video fixture)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from owl_jax.config import OwlConfig
from owl_jax.data.pixels import Normalizer, squash
from owl_jax.data.processor import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, OwlProcessor
from owl_jax.data.prompts import IMAGE_MARKER, VIDEO_MARKER, build_prompt
from owl_jax.data.video import decord_available

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
FIXTURE = os.path.join(FIXTURES, "mplug_owl_video_tiny")
LLAMA_FIXTURE = os.path.join(FIXTURES, "mplug_owl_tiny")
TOKENS = 9
needs_decord = pytest.mark.skipif(
    not decord_available(), reason="decord is not installed (pip install 'owl_jax[video]')"
)


@pytest.fixture(scope="module")
def spec():
    with open(os.path.join(FIXTURE, "prompts.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def processor():
    return OwlProcessor(FIXTURE, image_tokens=TOKENS, layout="video")


def _media(spec, key):
    return [os.path.join(FIXTURE, p) for per_prompt in spec[key] for p in per_prompt]


def _check_text_and_images(out, reference):
    np.testing.assert_array_equal(out["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], reference["attention_mask"])
    assert out["pixel_values"].shape == reference["pixel_values"].shape == (2, 3, 224, 224)
    assert np.abs(out["pixel_values"] - reference["pixel_values"]).max() <= 1e-6


# ------------------------------------------------------------------------------------ released reference
@needs_decord
def test_matches_released_processor(processor, spec, reference):
    assert spec["media_info"] == {IMAGE_MARKER: TOKENS, VIDEO_MARKER: TOKENS} and spec["num_frames"] == 4
    out = processor(spec["prompts"], images=_media(spec, "images_per_prompt"), videos=_media(spec, "videos_per_prompt"))
    _check_text_and_images(out, reference)
    assert out["video_pixel_values"].shape == reference["video_pixel_values"].shape == (3, 3, 4, 224, 224)
    assert out["video_pixel_values"].dtype == np.float32
    # the public order: processor(prompts, images=None, videos=None, num_frames=4)
    positional = processor(spec["prompts"], _media(spec, "images_per_prompt"), _media(spec, "videos_per_prompt"), 4)
    for key, value in out.items():
        np.testing.assert_array_equal(positional[key], value)
    assert np.abs(out["video_pixel_values"] - reference["video_pixel_values"]).max() <= 1e-6


def test_matches_released_processor_from_frames(processor, spec, reference):
    """The same from the frames the release read (no video reader needed)."""
    out = processor(spec["prompts"], images=_media(spec, "images_per_prompt"), videos=reference["video_frames"])
    _check_text_and_images(out, reference)
    assert np.abs(out["video_pixel_values"] - reference["video_pixel_values"]).max() <= 1e-6
    assert reference["num_images"].tolist() == [0, 1, 1] and reference["num_videos"].tolist() == [1, 1, 1]


def test_pyav_route_close_to_released(spec, reference):
    proc = OwlProcessor(FIXTURE, image_tokens=TOKENS, layout="video", video_backend="pyav")
    videos = proc.preprocess_videos(_media(spec, "videos_per_prompt"), num_frames=spec["num_frames"])
    assert videos.shape == reference["video_pixel_values"].shape
    assert np.abs(videos - reference["video_pixel_values"]).mean() <= 0.02  # 0.008 measured


def test_images_are_cropped_not_squashed(processor, spec, reference):
    """b.png (846×612) through the image package's squash is far from the video package's values."""
    path = os.path.join(FIXTURE, spec["images_per_prompt"][2][0])
    with Image.open(path) as im:
        squashed = Normalizer()(squash(im.convert("RGB"), 224))
    assert np.abs(squashed - reference["pixel_values"][1]).mean() > 0.05
    assert np.abs(processor.preprocess_images([path]) - reference["pixel_values"][1:]).max() <= 1e-6


def test_fixture_prompts_follow_template(spec):
    questions = [
        "What is moving in this video, and in which direction? Be brief.",
        "Does the picture show the same colours as the video?",
        "Describe the video first, then the picture.",
    ]
    media = [[VIDEO_MARKER], [IMAGE_MARKER, VIDEO_MARKER], [VIDEO_MARKER, IMAGE_MARKER]]
    assert [build_prompt(q, media=m) for q, m in zip(questions, media)] == spec["prompts"]
    with pytest.raises(ValueError, match="not one of"):
        build_prompt("q", media=["<audio>"])


# ----------------------------------------------------------------------------------------- markers
def test_markers_mixed_in_any_order(processor):
    for markers in ([VIDEO_MARKER, IMAGE_MARKER], [IMAGE_MARKER, VIDEO_MARKER], [VIDEO_MARKER, VIDEO_MARKER]):
        ids = processor.encode_prompt("\n".join(markers) + "\nAI: ")
        runs = [i for t, i in enumerate(ids) if i < 0 and ids[t - 1] != i]
        expected = [VIDEO_TOKEN_ID if m == VIDEO_MARKER else IMAGE_TOKEN_ID for m in markers]
        assert runs == expected and sum(i < 0 for i in ids) == TOKENS * len(markers)
    # Different markers back to back are two runs: fine.
    ids = processor.encode_prompt(f"x{IMAGE_MARKER}{VIDEO_MARKER}y")
    start = ids.index(IMAGE_TOKEN_ID)
    assert ids[start : start + 2 * TOKENS] == [IMAGE_TOKEN_ID] * TOKENS + [VIDEO_TOKEN_ID] * TOKENS
    assert min(ids[1:start] + ids[start + 2 * TOKENS :]) >= 0


@pytest.mark.parametrize("marker", [IMAGE_MARKER, VIDEO_MARKER])
def test_adjacent_identical_markers_rejected(processor, marker):
    with pytest.raises(ValueError, match="adjacent"):
        processor.encode_prompt(f"Human: {marker}{marker}\nAI: ")


def test_media_counts_must_match(processor, reference):
    frames = reference["video_frames"]
    image = np.zeros((8, 8, 3), np.uint8)
    one_video = build_prompt("q", media=[VIDEO_MARKER])
    with pytest.raises(ValueError, match=r"2 <\|video\|> markers .* but 1 videos"):
        processor(
            build_prompt("q", media=[VIDEO_MARKER, IMAGE_MARKER, VIDEO_MARKER]), images=[image], videos=frames[:1]
        )
    with pytest.raises(ValueError, match=r"1 <\|video\|> markers .* but 2 videos"):
        processor(one_video, videos=frames[:2])
    with pytest.raises(ValueError, match="but 0 videos"):
        processor(one_video)
    with pytest.raises(ValueError, match=r"0 <image> markers .* but 1 images"):
        processor(one_video, images=[image], videos=frames[0])
    out = processor(build_prompt("q"))
    assert out["video_pixel_values"].shape == (0, 3, 4, 224, 224) and out["pixel_values"].shape == (0, 3, 224, 224)


def test_bad_videos_and_frame_counts(processor, tmp_path, reference):
    prompt = build_prompt("q", media=[VIDEO_MARKER])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"no video here" * 10)
    with pytest.raises(ValueError, match=r"broken\.mp4.*not a readable video"):
        processor(prompt, videos=[str(broken)])
    a = os.path.join(FIXTURE, "videos", "a.mp4")
    with pytest.raises(ValueError, match=r"a\.mp4.*num_frames must be an integer of at least 2"):
        processor(prompt, videos=[a], num_frames=1)
    with pytest.raises(ValueError, match="num_frames must be an integer of at least 2"):
        processor(prompt, videos=reference["video_frames"][0][:1])
    with pytest.raises(ValueError, match="same number of frames"):
        processor(prompt + prompt, videos=[reference["video_frames"][0], reference["video_frames"][1][:3]])


# ------------------------------------------------------------------------------------------ layouts
def test_layout_comes_from_the_config(tmp_path):
    video = OwlProcessor.from_pretrained(FIXTURE, config=OwlConfig.from_hf_config(os.path.join(FIXTURE, "checkpoint")))
    assert (video.layout, video.image_tokens, video.image_size) == ("video", TOKENS, 224)
    image = OwlProcessor.from_pretrained(LLAMA_FIXTURE, config=OwlConfig.from_hf_config(LLAMA_FIXTURE + "/checkpoint"))
    assert image.layout == "image"
    # Without a config, the folder's own config.json decides.
    shutil.copy(os.path.join(FIXTURE, "tokenizer.model"), tmp_path / "tokenizer.model")
    shutil.copy(os.path.join(FIXTURE, "checkpoint", "config.json"), tmp_path / "config.json")
    assert OwlProcessor.from_pretrained(tmp_path).layout == "video"
    with pytest.raises(ValueError, match="layout"):
        OwlProcessor(FIXTURE, layout="audio")


def test_image_layout_keeps_video_marker_as_text(reference):
    image = OwlProcessor(FIXTURE, image_tokens=TOKENS)
    prompt = build_prompt("q", media=[VIDEO_MARKER])
    out = image(prompt)
    assert "video_pixel_values" not in out and (out["input_ids"] >= 0).all()
    with pytest.raises(ValueError, match="image layout"):
        image(prompt, videos=reference["video_frames"][:1])
