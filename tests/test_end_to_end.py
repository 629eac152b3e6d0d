"""From a released-layout folder with its tokenizer to logits: processor + model against the reference."""

import shutil

import numpy as np
from PIL import Image

import owl_jax


def test_from_pretrained_with_tokenizer_reproduces_reference(fixture_dir, tmp_path, reference):
    folder = tmp_path / "model"
    shutil.copytree(fixture_dir / "checkpoint", folder)
    shutil.copy(fixture_dir / "tokenizer.model", folder / "tokenizer.model")
    model, processor = owl_jax.from_pretrained(folder, show_progress=False)
    assert processor is not None
    prompts = __import__("json").loads((fixture_dir / "prompts.json").read_text())
    images = [Image.open(fixture_dir / p) for p in prompts["images"]]
    # sample 0 uses image a, sample 1 uses a and b, sample 2 none: images in prompt order across the batch
    inputs = processor(prompts["prompts"], images=[images[0], images[0], images[1]])
    np.testing.assert_array_equal(inputs["input_ids"], reference["input_ids"])
    logits = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    np.testing.assert_allclose(logits, reference["logits"], atol=1e-4, rtol=0)
