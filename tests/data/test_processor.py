"""OwlProcessor and the prompt template against the released PyTorch processor's outputs (the fixture)."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from owl_jax.config import OwlConfig
from owl_jax.data.processor import IMAGE_TOKEN_ID, OwlProcessor, find_tokenizer
from owl_jax.data.prompts import IMAGE_MARKER, SYSTEM, build_prompt, count_images

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "mplug_owl_tiny")
TOKENS_PER_IMAGE = 9


@pytest.fixture(scope="module")
def spec():
    with open(os.path.join(FIXTURE, "prompts.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


@pytest.fixture(scope="module")
def processor():
    return OwlProcessor(os.path.join(FIXTURE, "tokenizer.model"), image_size=224, image_tokens=TOKENS_PER_IMAGE)


def _image_paths(spec):
    a, b = (os.path.join(FIXTURE, p) for p in spec["images"])
    return [a, a, b]  # sample 0 shows a; sample 1 shows a then b; sample 2 none


# ------------------------------------------------------------------------------------ released reference
def test_matches_released_processor(processor, spec, reference):
    assert spec["image_tokens_per_image"] == TOKENS_PER_IMAGE
    out = processor(spec["prompts"], images=_image_paths(spec))
    np.testing.assert_array_equal(out["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], reference["attention_mask"])
    assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_values"].shape == reference["pixel_values"].shape == (3, 3, 224, 224)
    assert np.abs(out["pixel_values"] - reference["pixel_values"]).max() <= 1e-6
    per_prompt = [count_images(p) for p in spec["prompts"]]
    assert per_prompt == reference["num_images"].tolist()


def test_fixture_prompts_follow_template(spec):
    p0, p1, p2 = spec["prompts"]
    assert build_prompt("What is drawn in the upper left corner of this picture?", num_images=1) == p0
    assert (
        build_prompt([("How many circles can you count, and which colour is the largest one?", None)], num_images=2)
        == p1
    )
    assert build_prompt("Compare the two pictures: which one has more straight lines?") == p2


def test_from_pretrained_uses_config(tmp_path):
    config = OwlConfig.from_hf_config(os.path.join(FIXTURE, "checkpoint"))
    proc = OwlProcessor.from_pretrained(FIXTURE, config=config)
    assert (proc.image_size, proc.image_tokens) == (224, TOKENS_PER_IMAGE)
    # Without a config, the folder's own config.json decides the image token count.
    shutil.copy(os.path.join(FIXTURE, "tokenizer.model"), tmp_path / "tokenizer.model")
    shutil.copy(os.path.join(FIXTURE, "checkpoint", "config.json"), tmp_path / "config.json")
    assert OwlProcessor.from_pretrained(tmp_path).image_tokens == TOKENS_PER_IMAGE


def test_missing_tokenizer(tmp_path):
    assert find_tokenizer(tmp_path) is None
    assert find_tokenizer(FIXTURE) == os.path.join(FIXTURE, "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        OwlProcessor.from_pretrained(tmp_path)


# -------------------------------------------------------------------------------------------- template
def test_template_text_only_and_images():
    assert build_prompt("Hi?") == SYSTEM + "\nHuman: Hi?\nAI: "
    assert build_prompt("What is drawn?", num_images=1) == SYSTEM + "\nHuman: <image>\nHuman: What is drawn?\nAI: "
    assert build_prompt("Same?", num_images=2) == SYSTEM + "\nHuman: <image>\nHuman: <image>\nHuman: Same?\nAI: "


def test_template_multi_turn():
    turns = [("What is it?", "A cat."), ("What colour?", None)]
    expected = SYSTEM + "\nHuman: <image>\nHuman: What is it?\nAI: A cat.\nHuman: What colour?\nAI: "
    assert build_prompt(turns, num_images=1) == expected
    # A finished conversation (training text) ends with the last answer and a newline.
    assert build_prompt([("Q", "A")]) == SYSTEM + "\nHuman: Q\nAI: A\n"


def test_template_rejects_bad_turns():
    with pytest.raises(ValueError, match="only the last turn"):
        build_prompt([("a", None), ("b", None)])
    with pytest.raises(ValueError, match="<image>"):
        build_prompt("look: <image>")
    with pytest.raises(ValueError):
        build_prompt([])


# ----------------------------------------------------------------------------------------------- text
def test_adjacent_images_rejected(processor):
    with pytest.raises(ValueError, match="adjacent"):
        processor.encode_prompt("Human: <image><image>\nAI: ")
    # Whitespace between markers (the template's newline) is fine, and so are markers at either end.
    ids = processor.encode_prompt("<image>\n<image>")
    assert ids[0] == processor.bos_token_id
    assert ids.count(IMAGE_TOKEN_ID) == 2 * TOKENS_PER_IMAGE
    assert ids[1 : 1 + TOKENS_PER_IMAGE] == [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE
    assert ids[-TOKENS_PER_IMAGE:] == [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE


def test_image_count_must_match(processor, spec):
    a = os.path.join(FIXTURE, spec["images"][0])
    with pytest.raises(ValueError, match=r"2 <image> markers .* but 1 images"):
        processor(build_prompt("q", num_images=2), images=[a])
    with pytest.raises(ValueError, match="but 1 images"):
        processor(build_prompt("q"), images=[a])
    with pytest.raises(ValueError, match="but 0 images"):
        processor(build_prompt("q", num_images=1))


def test_padding_and_attention_mask(processor):
    short, long = "Hi", "A much longer prompt than the first one"
    n_short, n_long = len(processor.encode_prompt(short)), len(processor.encode_prompt(long))
    out = processor([short, long])
    assert out["input_ids"].shape == (2, n_long)
    assert out["attention_mask"].sum(axis=1).tolist() == [n_short, n_long]
    np.testing.assert_array_equal(out["attention_mask"][0], np.arange(n_long) < n_short)
    assert (out["input_ids"][0, n_short:] == processor.pad_token_id).all()
    assert processor.pad_token_id == processor.eos_token_id == 2 and processor.bos_token_id == 1
    assert out["pixel_values"].shape == (0, 3, 224, 224)

    padded = processor(short, max_length=20)
    assert padded["input_ids"].shape == (1, 20) and padded["attention_mask"].sum() == n_short
    assert processor([short, long], pad_to_multiple_of=16)["input_ids"].shape[1] == -(-n_long // 16) * 16
    with pytest.raises(ValueError, match="max_length"):
        processor(long, max_length=n_long - 1)


def test_decode_round_trip(processor):
    for text in ["Hello world", "café 日本語 x=42"]:
        ids = processor.encode_prompt(text)
        assert processor.decode(ids) == text
    # Image placeholders (-1) and eos padding are dropped.
    batch = processor(["<image>Hello world", "Hi"], images=[np.zeros((8, 8, 3), np.uint8)])
    assert processor.batch_decode(batch["input_ids"]) == ["Hello world", "Hi"]
    assert processor.decode(processor.encode_prompt("Hi") + [2], skip_special_tokens=False) == "<s> Hi</s>"


def test_plain_decode_matches_transformers(processor):
    """The SentencePiece fast path decodes every id sequence as transformers' id-by-id path does: random
    runs over the whole vocabulary (byte pieces, specials, unknown ids and media placeholders included)."""
    assert processor._plain_decode is not None
    tok = processor.tokenizer
    rng = np.random.default_rng(0)
    vocab = len(tok)
    byte_ids = [i for i in range(vocab) if tok.convert_ids_to_tokens(i).startswith("<0x")]
    for length in [0, 1, 2, 5, 17, 64] * 40:
        ids = rng.integers(0, vocab, length).tolist()
        if length > 1:  # splice in special ids, byte pieces and media placeholders
            ids[rng.integers(length)] = int(rng.choice([0, 1, 2, -1]))
            ids[rng.integers(length)] = int(rng.choice(byte_ids))
        expected = tok.decode([i for i in ids if i >= 0], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert processor.decode(ids) == expected, ids


def test_control_tokens_in_text_stay_text(processor):
    text = "a </s> b <s> c <unk>"
    ids = processor.encode_prompt(text)
    assert ids[0] == processor.bos_token_id
    assert not {0, 1, 2} & set(ids[1:]), "literal control-token text must not become control ids"
    assert processor.decode(ids) == text


# --------------------------------------------------------------------------------------------- images
def test_image_input_kinds_agree(processor, spec):
    path = os.path.join(FIXTURE, spec["images"][1])
    with Image.open(path) as im:
        pil = im.convert("RGB")
    arr = np.asarray(pil)
    from_path, from_pil, from_array = (processor.preprocess_images([x]) for x in (path, pil, arr))
    assert from_path.shape == (1, 3, 224, 224) and from_path.dtype == np.float32
    np.testing.assert_array_equal(from_path, from_pil)
    np.testing.assert_array_equal(from_path, from_array)
    # Grayscale arrays become RGB like the PIL conversion does.
    gray = arr[..., 0].copy()
    np.testing.assert_array_equal(
        processor.preprocess_images([gray]), processor.preprocess_images([Image.fromarray(gray)])
    )


def test_bad_images_rejected(processor, tmp_path, spec):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png"):
        processor.preprocess_images([str(broken)])
    small = OwlProcessor(os.path.join(FIXTURE, "tokenizer.model"), max_image_pixels=1000)
    with pytest.raises(ValueError, match="max_image_pixels"):
        small.preprocess_images([os.path.join(FIXTURE, spec["images"][1])])
    with pytest.raises(ValueError, match="uint8"):
        processor.preprocess_images([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(TypeError):
        processor.preprocess_images([123])


def test_image_marker_constant():
    assert IMAGE_MARKER == "<image>" and count_images("<image>\n<image> x") == 2


@pytest.mark.parametrize(
    "text",
    ["a</s>b <s> c", "<unk>", "  leading", "x\n\ny", "AI: ", "é 東京 12345", "trailing  ", "tabs\tand\u00a0nbsp"],
)
def test_chunks_encode_like_plain_sentencepiece(processor, text):
    """The released tokenizer (built directly from tokenizer.model) is SentencePiece's own encode, with
    no special-token splitting; each chunk gets the dummy prefix."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(FIXTURE, "tokenizer.model"))
    ids = processor.encode_prompt(text)
    assert ids == [1] + sp.encode(text)
