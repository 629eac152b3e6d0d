"""OwlProcessor with the BLOOMZ tokenizer (`tokenizer.json`) against the released processor's outputs."""

import json
import os
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from owl_jax.data.processor import IMAGE_TOKEN_ID, OwlProcessor
from owl_jax.data.prompts import IMAGE_MARKER, build_prompt, count_images

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
FIXTURE = os.path.join(FIXTURES, "mplug_owl_bloomz_tiny")
LLAMA_FIXTURE = os.path.join(FIXTURES, "mplug_owl_tiny")
TOKENS_PER_IMAGE = 9
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def spec():
    with open(os.path.join(FIXTURE, "prompts.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def processor():
    return OwlProcessor(FIXTURE, image_size=224, image_tokens=TOKENS_PER_IMAGE)


def _copy_tokenizer(folder, names=TOKENIZER_FILES):
    for name in names:
        shutil.copy(os.path.join(FIXTURE, name), folder / name)
    return folder


def test_matches_released_processor(processor, spec, reference):
    assert spec["image_tokens_per_image"] == TOKENS_PER_IMAGE
    images = [os.path.join(FIXTURE, p) for per_prompt in spec["images_per_prompt"] for p in per_prompt]
    out = processor(spec["prompts"], images=images)
    np.testing.assert_array_equal(out["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], reference["attention_mask"])
    assert out["pixel_values"].shape == reference["pixel_values"].shape == (3, 3, 224, 224)
    assert np.abs(out["pixel_values"] - reference["pixel_values"]).max() <= 1e-6
    assert [count_images(p) for p in spec["prompts"]] == reference["num_images"].tolist()
    assert set(out) == {"input_ids", "attention_mask", "pixel_values"}


def test_bos_first_and_eos_padding(processor, reference):
    assert (processor.bos_token_id, processor.eos_token_id, processor.pad_token_id) == (1, 2, 2)
    assert (reference["input_ids"][:, 0] == processor.bos_token_id).all()
    padded = reference["attention_mask"] == 0
    assert padded.any() and (reference["input_ids"][padded] == processor.pad_token_id).all()


def test_chunks_are_tokenized_alone_without_special_tokens(processor, spec):
    """Each stretch between markers is the plain byte-level BPE of that text (tokenizers' own encode)."""
    plain = Tokenizer.from_file(os.path.join(FIXTURE, "tokenizer.json"))
    prompt = spec["prompts"][1]
    expected = [1]
    for i, chunk in enumerate(prompt.split(IMAGE_MARKER)):
        expected += [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE if i else []
        expected += plain.encode(chunk, add_special_tokens=False).ids
    assert processor.encode_prompt(prompt) == expected


def test_multilingual_round_trip(processor):
    for text in ["这张图片的左上角画的是什么？", "Combien de cercles ? Répondez.", "Kreis und Quadrat", "원은"]:
        ids = processor.encode_prompt(text)
        assert ids[0] == 1 and processor.decode(ids) == text
    assert processor.decode(processor.encode_prompt("Hi") + [2], skip_special_tokens=False) == "<s>Hi</s>"


def test_ids_beyond_the_tokenizer_decode_as_unknown(processor):
    """The model has 1024 rows, the tokenizer 960 ids: greedy decoding may emit 960..1023."""
    assert len(processor.tokenizer) == 960
    spare = list(range(960, 1024))
    assert processor.decode(spare) == ""
    assert processor.decode(spare, skip_special_tokens=False) == "<unk>" * len(spare)
    word = processor.encode_prompt("Kreis")[1:]
    assert processor.decode([1, *word, 1000, *word, 2]) == "KreisKreis"
    assert processor.batch_decode(np.asarray([[1, *word, 1023]])) == ["Kreis"]


def test_control_tokens_in_text_stay_text(processor):
    text = "a </s> b <s> c <unk> <pad>"
    ids = processor.encode_prompt(text)
    assert not {0, 1, 2, 3} & set(ids[1:]), "literal control-token text must not become control ids"
    assert processor.decode(ids) == text


def test_loads_local_folder_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = _copy_tokenizer(tmp_path)
    proc = OwlProcessor.from_pretrained(folder, image_tokens=TOKENS_PER_IMAGE)
    assert proc.encode_prompt(build_prompt("Kreis?")) == OwlProcessor(FIXTURE).encode_prompt(build_prompt("Kreis?"))
    # The file itself works as well as its folder.
    assert OwlProcessor(folder / "tokenizer.json").bos_token_id == 1


def test_sentencepiece_wins_when_both_files_are_present(tmp_path):
    _copy_tokenizer(tmp_path)
    shutil.copy(os.path.join(LLAMA_FIXTURE, "tokenizer.model"), tmp_path / "tokenizer.model")
    text = build_prompt("What is drawn?")
    assert OwlProcessor(tmp_path).encode_prompt(text) == OwlProcessor(LLAMA_FIXTURE).encode_prompt(text)


@pytest.mark.parametrize("role", ["bos", "eos"])
def test_tokenizer_without_bos_or_eos_rejected(tmp_path, role):
    _copy_tokenizer(tmp_path, ["tokenizer.json"])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config[f"{role}_token"] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"has no {role.upper()} token") as info:
        OwlProcessor(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model or tokenizer\.json"):
        OwlProcessor.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the tokenizer") as info:
        OwlProcessor(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)
