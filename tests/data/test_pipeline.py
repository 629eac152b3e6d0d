"""Training data path: tokenization with the answer mask, truncation, bad records, sharding and resuming."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from helpers import solid_png
from owl_jax.data.conversation import IMAGE_ID, tokenize_conversation
from owl_jax.data.pipeline import SKIP_REASONS, ExampleTransform, PipelineSpec, training_batches
from owl_jax.data.prompts import SYSTEM, templated_text
from owl_jax.data.records import Example, write_shards

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "mplug_owl_tiny", "tokenizer.model")


def png(color=(200, 30, 30), size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def fake_encode(text: str) -> list[int]:
    """One id per character (offset past the special ids): easy to read back in tests."""
    return [10 + (ord(c) % 50) for c in text]


def test_answers_and_their_eos_are_the_only_targets():
    text = templated_text([("Q1", "ab"), ("Q2", "c")], num_images=1)
    t = tokenize_conversation(text, fake_encode, seq_len=400, image_tokens=3)
    ids = t.input_ids[: t.attention_mask.sum()]
    targets = ids[1:][t.loss_mask[: len(ids) - 1] > 0]
    assert list(targets) == fake_encode("ab") + [2] + fake_encode("c") + [2]
    assert list(ids[:1]) == [1] and (ids == IMAGE_ID).sum() == 3 and t.num_images == 1
    assert not t.truncated and (t.input_ids[len(ids) :] == 0).all()


def test_truncation_never_cuts_an_image_run():
    text = templated_text([("Q", "answer")], num_images=2)
    full = tokenize_conversation(text, fake_encode, seq_len=400, image_tokens=5)
    first = int(np.flatnonzero(full.input_ids == IMAGE_ID)[0])
    second = int(np.flatnonzero(full.input_ids == IMAGE_ID)[5])
    t = tokenize_conversation(text, fake_encode, seq_len=second + 2, image_tokens=5)  # cut inside image 2
    real = t.input_ids[: t.attention_mask.sum()]
    assert t.truncated and t.num_images == 1 and t.attention_mask.sum() == second
    assert (real == IMAGE_ID).sum() == 5 and first < second
    assert not t.loss_mask.any()  # the answer was cut away: nothing to train on


@pytest.fixture(scope="module")
def transform():
    return ExampleTransform(PipelineSpec(seq_len=96, max_images=2, image_size=28, image_tokens=3), TOKENIZER)


def test_row_shapes_and_pixels(transform):
    row = transform(Example(turns=[("What colour?", "red")], images=[png()], task="multimodal").to_bytes())
    assert row["skipped"] == 0 and row["image_mask"].tolist() == [1, 0]
    assert row["pixel_values"].shape == (2, 3, 28, 28) and row["pixel_values"][1].max() == 0
    assert row["loss_mask"].sum() > 0 and (row["input_ids"] == IMAGE_ID).sum() == 3


@pytest.mark.parametrize(
    "record, reason",
    [
        (b"\x05\x00\x00\x00{bad json", 1),
        (Example(turns=[("q", "a")], images=[b"not an image at all"], task="multimodal").to_bytes(), 2),
        # 80,000,000x1: under the pixel limit, but its decode would need gigabytes (refused by the header)
        (Example(turns=[("q", "a")], images=[solid_png(80_000_000, 1)], task="multimodal").to_bytes(), 2),
        (Example(turns=[("q", "a")], images=[png(), png(), png()], task="multimodal").to_bytes(), 4),
        (Example(turns=[], images=[png()], task="multimodal").to_bytes(), 1),
        (Example(turns=[("q " * 200, "a")], task="text").to_bytes(), 3),
    ],
)
def test_unusable_records_become_masked_rows_with_a_reason(transform, record, reason):
    """Corrupt image, too many images, malformed record, empty conversation, over-long prompt."""
    row = transform(record)
    assert row["skipped"] == reason and SKIP_REASONS[reason] != "ok"
    assert row["loss_mask"].sum() == 0 and row["attention_mask"].sum() == 0


def _dataset(tmp_path, name, n, task="multimodal"):
    examples = [
        Example(
            turns=[(f"question {i}", f"answer {i}")],
            images=[png((i * 7 % 255, 20, 30))] if task != "text" else [],
            task=task,
            id=str(i),
        )
        for i in range(n)
    ]
    return write_shards(examples, str(tmp_path / name), examples_per_shard=7)[0].rsplit("-", 3)[0]


def test_processes_share_one_global_order(tmp_path, transform):
    prefix = _dataset(tmp_path, "mm", 20)
    single = iter(training_batches([[prefix]], transform, batch_size=4, seed=3))
    parts = [
        iter(training_batches([[prefix]], transform, batch_size=4, seed=3, process_index=p, process_count=2))
        for p in range(2)
    ]
    for _ in range(6):
        expected = next(single)["input_ids"]
        got = np.concatenate([next(it)["input_ids"] for it in parts])
        np.testing.assert_array_equal(got, expected)


def test_mixture_is_half_and_half_every_batch(tmp_path, transform):
    text, mm = _dataset(tmp_path, "text", 9, task="text"), _dataset(tmp_path, "mm", 11)
    it = iter(training_batches([[text], [mm]], transform, batch_size=6, seed=0))
    for _ in range(5):
        batch = next(it)
        assert batch["image_mask"].sum() == 3  # three multimodal rows with one image each, three text rows


def test_iterator_state_resumes_the_exact_order(tmp_path, transform):
    prefix = _dataset(tmp_path, "mm", 13)
    it = iter(training_batches([[prefix]], transform, batch_size=4, seed=1))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["input_ids"] for _ in range(4)]
    resumed = iter(training_batches([[prefix]], transform, batch_size=4, seed=1))
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want)


def test_system_prompt_is_the_released_one():
    assert templated_text([("q", "a")]).startswith(SYSTEM + "\nHuman: q\nAI: a")
    assert templated_text([("", "a caption")], num_images=1) == SYSTEM + "\nHuman: <image>\nAI: a caption"
