"""The "prompt" training tokenization: a row holds exactly the ids that chat, the server and the evaluators
feed the model for the same question, followed by the answer it should write."""

import io
import os
import random

import numpy as np
import pytest
from PIL import Image

from owl_jax.data import synthetic_scenes as scenes
from owl_jax.data.conversation import IMAGE_ID, tokenize_conversation
from owl_jax.data.pipeline import ExampleTransform, PipelineSpec
from owl_jax.data.processor import OwlProcessor
from owl_jax.data.prompts import templated_text
from owl_jax.data.records import Example
from owl_jax.training.answers import prompt_of

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "mplug_owl_tiny", "tokenizer.model")
pytestmark = pytest.mark.compile_quickly


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _example(question_type: str, seed: int) -> Example:
    item = scenes.sample_item(random.Random(seed), question_type, image_size=32)
    images = [_png(scenes.render(s)) for s in item.scenes]
    return Example(turns=item.turns, images=images, task="multimodal" if images else "text", source=question_type)


@pytest.fixture(scope="module")
def processor():
    return OwlProcessor(TOKENIZER, image_size=32, image_tokens=5)


@pytest.mark.parametrize("question_type", scenes.QUESTION_TYPES)
def test_the_trained_context_is_the_inference_prompt(processor, question_type):
    example = _example(question_type, seed=7)
    spec = PipelineSpec(seq_len=160, max_images=2, image_size=32, image_tokens=5, tokenization="prompt")
    row = ExampleTransform(spec, TOKENIZER)(example.to_bytes())
    assert row["skipped"] == 0
    ids = row["input_ids"][: row["attention_mask"].sum()]
    first_target = int(np.flatnonzero(row["loss_mask"])[0]) + 1
    # What a user's question becomes at inference, through the processor (chat, server and evaluators).
    images = [Image.open(io.BytesIO(b)) for b in example.images]
    asked = processor(prompt_of(example), images=images or None)
    prompt_ids = asked["input_ids"][0][: asked["attention_mask"][0].sum()]
    np.testing.assert_array_equal(ids[:first_target], prompt_ids)
    # ... followed by the last answer and EOS, the only targets; the pixels are the processor's too.
    answer = processor.tokenizer.encode(example.turns[-1][1], add_special_tokens=False)
    assert ids[first_target:].tolist() == answer + [processor.eos_token_id]
    assert row["loss_mask"].sum() == len(answer) + 1
    np.testing.assert_allclose(row["pixel_values"][: len(images)], asked["pixel_values"], atol=1e-6)


def test_released_tokenization_differs_where_the_prompt_one_was_needed(processor):
    """The released pieces (split at every turn) do not start the way the processor's prompt does, which is
    why a small model trained on them answers worse on its own than teacher-forced."""
    text = templated_text([("Which picture shows a red shape, the first or the second?", "first")], num_images=2)
    encode = lambda s: processor.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    released = tokenize_conversation(text, encode, seq_len=160, image_tokens=5)
    prompt = tokenize_conversation(text, encode, seq_len=160, image_tokens=5, tokenization="prompt")
    cut = lambda t: t.input_ids[: int(np.flatnonzero(t.loss_mask)[0]) + 1].tolist()  # noqa: E731
    assert cut(released) != cut(prompt)
    assert (prompt.input_ids == IMAGE_ID).sum() == (released.input_ids == IMAGE_ID).sum() == 10


def test_prompt_tokenization_trains_only_the_last_answer():
    encode = lambda s: [10 + (ord(c) % 50) for c in s]  # noqa: E731
    text = templated_text([("Q1", "ab"), ("Q2", "c")], num_images=0)
    t = tokenize_conversation(text, encode, seq_len=400, image_tokens=3, tokenization="prompt")
    ids = t.input_ids[: t.attention_mask.sum()]
    assert list(ids[1:][t.loss_mask[: len(ids) - 1] > 0]) == encode("c") + [2]
    with pytest.raises(ValueError, match="tokenization must be one of"):
        tokenize_conversation(text, encode, seq_len=400, image_tokens=3, tokenization="whole")
