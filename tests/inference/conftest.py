"""Fixtures shared by the generation tests."""

import shutil

import pytest

import owl_jax
from helpers import FIXTURE


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory):
    """The tiny reference model and its processor, loaded from a folder holding its checkpoint and tokenizer."""
    folder = tmp_path_factory.mktemp("model")
    shutil.copytree(FIXTURE / "checkpoint", folder / "m")
    shutil.copy(FIXTURE / "tokenizer.model", folder / "m" / "tokenizer.model")
    return owl_jax.from_pretrained(folder / "m", show_progress=False)
