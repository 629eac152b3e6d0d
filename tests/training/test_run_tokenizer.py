"""The tokenizer a run trains with: found beside the checkpoint (SentencePiece or BLOOM's tokenizer.json),
carried into `model/` under its own names, and never the demo tokenizer for a BLOOM model."""

import dataclasses
import re
import shutil

import pytest

from helpers import tiny_training_config
from layout_models import BLOOMZ, checkpoint_with_tokenizer, tiny_bloom_config
from owl_jax.config import ConfigError, OwlConfig
from owl_jax.training.tokenizer_files import DEMO_TOKENIZER, run_tokenizer

BLOOM_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def checkpoint_config(folder, **changes):
    return tiny_training_config(**{"model.init": "checkpoint", "model.checkpoint": str(folder), **changes})


def test_bloom_checkpoint_brings_its_tokenizer_json_and_the_files_naming_its_special_tokens(tmp_path):
    folder = checkpoint_with_tokenizer("bloom", tmp_path / "bloomz")
    cfg = OwlConfig.from_hf_config(folder)
    tokenizer = run_tokenizer(checkpoint_config(folder), cfg)
    assert (tokenizer.path, tokenizer.bos_id, tokenizer.eos_id, tokenizer.size) == (
        str(folder / "tokenizer.json"),
        1,
        2,
        960,
    )
    (tmp_path / "out").mkdir()
    assert tokenizer.copy_into(str(tmp_path / "out")) == BLOOM_FILES
    for name in BLOOM_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (BLOOMZ / name).read_bytes()


def test_bloom_checkpoint_without_a_tokenizer_names_the_folder(tmp_path):
    folder = tmp_path / "weights_only"
    shutil.copytree(BLOOMZ / "checkpoint", folder)
    cfg = OwlConfig.from_hf_config(folder)
    message = (
        f"model.checkpoint={str(folder)!r} holds no tokenizer.json or tokenizer.model, and a bloom model does not "
        "train with the demo LLaMA tokenizer"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        run_tokenizer(checkpoint_config(folder), cfg)
    with pytest.raises(ConfigError, match="^tokenizer is empty, and a bloom model does not train with the demo"):
        run_tokenizer(tiny_training_config(), tiny_bloom_config())  # a random BLOOM has no folder to look in


def test_run_refuses_a_bloom_checkpoint_without_tokenizer_before_any_work(tmp_path):
    from owl_jax.training.run import run

    folder = tmp_path / "weights_only"
    shutil.copytree(BLOOMZ / "checkpoint", folder)
    config = checkpoint_config(folder, workdir=str(tmp_path / "w"))
    with pytest.raises(ConfigError, match=f"^model.checkpoint={re.escape(repr(str(folder)))} holds no tokenizer"):
        run(config)
    assert not (tmp_path / "w").exists()


def test_named_tokenizer_must_exist_and_fit_the_vocabulary(tmp_path):
    cfg = tiny_bloom_config()
    with pytest.raises(ConfigError, match=r"^tokenizer='.*empty' is not a tokenizer.model or tokenizer.json"):
        run_tokenizer(tiny_training_config(tokenizer=str(tmp_path / "empty")), cfg)
    small = tiny_training_config(tokenizer=str(BLOOMZ))
    with pytest.raises(ConfigError, match="^tokenizer: the tokenizer at .* has 960 tokens, more than the model's text"):
        run_tokenizer(small, cfg)  # vocab_size 64
    big = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=1024))
    assert run_tokenizer(small, big).path == str(BLOOMZ / "tokenizer.json")


def test_random_llama_trains_with_the_demo_tokenizer(tmp_path):
    config = tiny_training_config()
    tokenizer = run_tokenizer(config, OwlConfig.from_hf_config(config.model.arch.to_dict()))
    assert tokenizer.path == DEMO_TOKENIZER and tokenizer.files() == {"tokenizer.model": DEMO_TOKENIZER}
