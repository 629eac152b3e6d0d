"""Greedy decoding with videos reproduces the released video model's `generate` (the fixture's greedy_0/1/2)."""

import numpy as np
import pytest

from helpers import VIDEO_FIXTURE, load_fixture_model
from owl_jax.inference.generate import GenerationConfig, Generator

GREEDY = GenerationConfig(max_new_tokens=12, min_new_tokens=12)  # the fixture's generate() call
IMAGES_OF_ROW = {0: [], 1: [0], 2: [1]}  # prompts.json: one video per prompt, rows 1 and 2 also an image


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(VIDEO_FIXTURE / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def generator():
    return Generator(load_fixture_model(str(VIDEO_FIXTURE / "checkpoint")))


@pytest.fixture(scope="module")
def expected(ref) -> list:
    return [ref[f"greedy_{row}"][1:].tolist() for row in range(3)]  # the fixture's first id is HF's BOS


def test_greedy_matches_released_generate_for_each_prompt_alone(generator, ref, expected):
    ids, mask, images, videos = ref["input_ids"], ref["attention_mask"], ref["pixel_values"], ref["video_pixel_values"]
    for row in range(3):
        n = int(mask[row].sum())
        row_images = images[IMAGES_OF_ROW[row]] if IMAGES_OF_ROW[row] else None
        alone = generator.generate(ids[row : row + 1, :n], None, row_images, GREEDY, videos[row : row + 1])
        assert alone.tokens[0] == expected[row], row


def test_greedy_matches_released_generate_in_a_left_padded_batch(generator, ref, expected):
    """The right-padded batch is re-laid out left-padded; each row still decodes as it does alone."""
    batch = generator.generate(
        ref["input_ids"],
        ref["attention_mask"],
        ref["pixel_values"],
        GREEDY,
        video_pixel_values=ref["video_pixel_values"],
    )
    assert batch.tokens == expected


def test_more_video_runs_than_videos_is_refused(generator, ref):
    with pytest.raises(ValueError, match="3 video placeholder runs but video_pixel_values has 1 videos"):
        generator.generate(
            ref["input_ids"], ref["attention_mask"], ref["pixel_values"], GREEDY, ref["video_pixel_values"][:1]
        )
