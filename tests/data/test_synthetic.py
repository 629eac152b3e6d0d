"""The synthetic shapes dataset: determinism, file formats, answers that match the pixels, held-out eval."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from owl_jax.data import synthetic as S
from owl_jax.data import synthetic_scenes as scenes
from owl_jax.data.prompts import SYSTEM, templated_text

SMALL = dict(n_captions=12, n_multimodal=24, n_text=8, n_eval_per_type=6)
FILES = ("captions.jsonl", "instruct_multimodal.jsonl", "instruct_text.jsonl", "eval.jsonl")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return S.generate(tmp_path_factory.mktemp("synthetic"), seed=0, **SMALL)


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _colors_present(image: Image.Image) -> set:
    """Palette colours covering a visible area (background pixels are all light, every shape hue is not)."""
    pixels = np.asarray(image.convert("RGB"), np.int32).reshape(-1, 3)
    shape = pixels[pixels.min(axis=1) < 150]
    if not len(shape):
        return set()
    palette = np.array(list(scenes.COLORS.values()))
    nearest = np.argmin(((shape[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    names = list(scenes.COLORS)
    return {names[i] for i, n in enumerate(np.bincount(nearest, minlength=len(names))) if n >= 30}


def test_deterministic_and_seed_dependent(dataset, tmp_path):
    import pathlib

    first = _tree_bytes(pathlib.Path(dataset.root))
    again = S.generate(tmp_path / "again", seed=0, **SMALL)
    assert _tree_bytes(pathlib.Path(again.root)) == first
    other = _tree_bytes(pathlib.Path(S.generate(tmp_path / "other", seed=1, **SMALL).root))
    for name in FILES:
        assert other[name] != first[name]


def test_files_parse_and_images_have_the_right_size(dataset, tmp_path):
    root = dataset.root
    captions = S.read_jsonl(dataset.captions)
    assert len(captions) == dataset.n_captions == SMALL["n_captions"]
    for row in captions:
        assert set(row) == {"image", "caption"} and row["caption"]
    multimodal = S.read_jsonl(dataset.instruct_multimodal)
    text = S.read_jsonl(dataset.instruct_text)
    evaluation = S.read_jsonl(dataset.eval)
    assert (len(multimodal), len(text), len(evaluation)) == (24, 8, 6 * len(scenes.QUESTION_TYPES))
    for row in multimodal:
        assert set(row) == {"image", "text", "task_type"} and row["task_type"] == "llava_sft"
        turns, num_images = S.parse_templated_text(row["text"])
        assert num_images == len(row["image"]) >= 1 and turns
    for row in text:
        assert set(row) == {"text", "task_type"} and row["task_type"] == "gpt4instruct_sft"
        assert S.parse_templated_text(row["text"])[1] == 0
    referenced = [c["image"] for c in captions] + [p for r in multimodal + evaluation for p in r.get("image", [])]
    assert len(referenced) == dataset.n_images
    for rel in referenced:
        assert not rel.startswith("/") and rel.startswith("images/")
        with Image.open(f"{root}/{rel}") as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    small = S.generate(tmp_path / "small", image_size=32, n_captions=2, n_multimodal=6, n_text=1, n_eval_per_type=1)
    for row in S.read_jsonl(small.instruct_multimodal):
        for rel in row["image"]:
            assert Image.open(f"{small.root}/{rel}").size == (32, 32)


def test_templated_text_layout():
    text = templated_text([("What colour is the shape?", "red"), ("What shape is it?", "circle")], 1)
    assert text == (
        SYSTEM + "\nHuman: <image>\nHuman: What colour is the shape?\nAI: red\nHuman: What shape is it?\nAI: circle"
    )
    assert templated_text([("Q?", "A")], 0) == SYSTEM + "\nHuman: Q?\nAI: A"
    assert S.parse_templated_text(text) == ([("What colour is the shape?", "red"), ("What shape is it?", "circle")], 1)
    with pytest.raises(ValueError):
        templated_text([("Q?", None)], 0)


def test_answers_match_the_drawn_scene():
    rng = random.Random(7)
    for _ in range(20):
        item = scenes.sample_item(rng, "color")
        (shape,) = item.scenes[0].shapes
        pixel = np.asarray(scenes.render(item.scenes[0]), np.int32)[shape.center[1], shape.center[0]]
        palette = {name: np.sum((pixel - np.array(rgb)) ** 2) for name, rgb in scenes.COLORS.items()}
        assert min(palette, key=palette.get) == item.answers[0] == shape.color
    for _ in range(20):
        item = scenes.sample_item(rng, "count")
        shapes = item.scenes[0].shapes
        assert scenes.NUMBER_WORDS[len(shapes) - 1] == item.answers[0]
        assert len({(s.kind, s.color) for s in shapes}) == 1
        for a in shapes:  # non-overlapping boxes
            for b in shapes:
                if a is not b:
                    assert (
                        a.x0 + a.size <= b.x0 or b.x0 + b.size <= a.x0 or a.y0 + a.size <= b.y0 or b.y0 + b.size <= a.y0
                    )
    for _ in range(20):
        item = scenes.sample_item(rng, "position")
        (shape,) = item.scenes[0].shapes
        half = item.scenes[0].image_size // 2
        assert (shape.x0 + shape.size <= half) if item.answers[0] == "left" else (shape.x0 >= half)
    for _ in range(20):
        item = scenes.sample_item(rng, "multi_turn")
        (shape,) = item.scenes[0].shapes
        assert item.answers == (shape.color, shape.kind) and shape.kind in scenes.SHAPES
    for _ in range(10):
        relation, word, answer = scenes.TEXT_FACTS[rng.randrange(len(scenes.TEXT_FACTS))]
        if relation == "after":
            assert scenes.NUMBER_WORDS.index(answer) == scenes.NUMBER_WORDS.index(word) + 1


def test_written_files_agree_with_pixels(dataset):
    for row in S.read_jsonl(dataset.eval) + S.read_jsonl(dataset.instruct_multimodal):
        turns, _ = S.parse_templated_text(row["text"])
        images = [Image.open(f"{dataset.root}/{p}") for p in row["image"]] if "image" in row else []
        question, answer = turns[0]
        if any(question == q for q in scenes.QUESTIONS["color"]) and len(images) == 1:
            assert _colors_present(images[0]) == {answer}
        elif "first or" in question:
            asked = next(c for c in scenes.COLORS if f" {c} " in question)
            present = [asked in _colors_present(im) for im in images]
            assert present == [answer == "first", answer == "second"]


def test_eval_is_held_out_and_covers_every_type(dataset):
    evaluation = S.read_jsonl(dataset.eval)
    assert {row["question_type"] for row in evaluation} == set(scenes.QUESTION_TYPES) == set(dataset.question_types)
    train = S.read_jsonl(dataset.instruct_multimodal)
    train_paths = {p for r in train for p in r["image"]} | {c["image"] for c in S.read_jsonl(dataset.captions)}
    pixels = lambda rel: Image.open(f"{dataset.root}/{rel}").tobytes()  # noqa: E731
    train_pixels = {pixels(p) for p in train_paths}
    for row in evaluation:
        for rel in row.get("image", []):
            assert rel not in train_paths and pixels(rel) not in train_pixels
    # The multimodal mixture spreads over every visual type.
    asked = [S.parse_templated_text(r["text"])[0][0][0] for r in train]
    assert set(scenes.MULTIMODAL_MIX) == set(scenes.VISUAL_TYPES)
    slots = [scenes.MULTIMODAL_MIX[i % len(scenes.MULTIMODAL_MIX)] for i in range(len(train))]
    assert sum("first or" in q for q in asked) == slots.count("two_image")
    assert sum(len(S.parse_templated_text(r["text"])[0]) == 2 for r in train) == slots.count("multi_turn")


def test_majority_baseline():
    def row(question_type, *answers):
        turns = [(f"q{i}?", a) for i, a in enumerate(answers)]
        return {"question_type": question_type, "text": templated_text(turns, 1), "image": ["images/x.png"]}

    items = [
        row("color", "red"),
        row("color", "red"),
        row("color", "blue"),
        row("color", "green"),
        row("multi_turn", "red", "circle"),
        row("multi_turn", "red", "square"),
        row("multi_turn", "red", "circle"),
        row("text", "down"),
    ]
    assert S.majority_baseline(items) == {"color": 0.5, "multi_turn": 2 / 3, "text": 1.0}
    assert S.majority_baseline(json.loads(json.dumps(i)) for i in items[:2]) == {"color": 1.0}
    as_items = [scenes.Item("count", [("How many?", "two")]), scenes.Item("count", [("How many?", "one")])]
    assert S.majority_baseline(as_items) == {"count": 0.5}
