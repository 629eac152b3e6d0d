"""A synthetic shapes dataset that a tiny mPLUG-Owl can learn on a CPU in minutes.

`python train.py` without arguments trains both stages on data made here, so the data has to be learnable
quickly by a tiny ViT and LLaMA (flat colours, large shapes, one-word answers), varied enough that held-out
accuracy means something (random placement, sizes, colour jitter, background tint, 3 phrasings per
question), and cheap and deterministic to make (PIL drawing on 64x64 pixels, string-seeded RNG streams).

It is written in the project's real source formats, so training goes through the same prepare path as
real data:

    images/*.png
    captions.jsonl              {"image": "images/x.png", "caption": "a red circle on the left"}   (stage 1)
    instruct_multimodal.jsonl   {"image": [...], "text": <templated conversation>, "task_type": "llava_sft"}
    instruct_text.jsonl         {"text": <templated conversation>, "task_type": "gpt4instruct_sft"}
    eval.jsonl                  the released format plus "question_type", drawn from its own seed stream
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from owl_jax.data.prompts import AI, HUMAN, IMAGE_MARKER, SYSTEM, templated_text

# Pure-ish hues far apart in RGB, so a 16-px patch embedding separates them after a few hundred steps.
COLORS = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 70, 215), "yellow": (235, 200, 25)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Every word appears once, so "opposite of X" has one answer in both directions.
OPPOSITES = (("up", "down"), ("big", "small"), ("hot", "cold"), ("open", "closed"), ("day", "night"),
             ("fast", "slow"), ("old", "new"), ("happy", "sad"), ("light", "dark"), ("in", "out"),
             ("yes", "no"), ("wet", "dry"))

VISUAL_TYPES = ("color", "shape", "count", "position", "two_image", "multi_turn")
QUESTION_TYPES = VISUAL_TYPES + ("text",)
# The training mixture of multimodal items, in slots: two-image questions get two, as they are the only ones
# that need the LLM to tell its images apart, which the adapters learn slowest (eval keeps equal counts).
MULTIMODAL_MIX = VISUAL_TYPES + ("two_image",)

# A few phrasings per type so the model has to read the question rather than key on its exact tokens.
QUESTIONS = {
    "color": ("What colour is the shape?", "What color is the shape in the picture?", "Which colour is the object?"),
    "shape": ("What shape is in the picture?", "What kind of shape is shown?", "Name the shape in the image."),
    "count": ("How many shapes are there?", "How many shapes can you see?", "Count the shapes in the picture."),
    "position": ("Is the shape on the left or the right?", "Which side is the shape on, left or right?",
                 "Where is the shape, on the left or on the right?"),
    "two_image": ("Which picture shows a {color} shape, the first or the second?",
                  "Which image has a {color} shape, first or second?",
                  "Is the {color} shape in the first or the second picture?"),
    "follow_up_shape": ("What shape is it?", "And which shape is it?", "What shape is in the picture?"),
    "opposite": ("What is the opposite of {word}?", "Give the opposite of {word}.",
                 "Name the opposite of the word {word}."),
    "after": ("What number comes after {word}?", "Which number follows {word}?", "What comes next after {word}?"),
}
TEXT_FACTS = tuple(("opposite", a, b) for a, b in OPPOSITES) + tuple(("opposite", b, a) for a, b in OPPOSITES) \
    + tuple(("after", NUMBER_WORDS[i], NUMBER_WORDS[i + 1]) for i in range(len(NUMBER_WORDS) - 1))

MULTIMODAL_TASK_TYPE = "llava_sft"
TEXT_TASK_TYPE = "gpt4instruct_sft"


# ----------------------------------------------------------------------------------------------- scenes
@dataclasses.dataclass(frozen=True)
class Shape:
    """One filled shape inside the square box with corner (x0, y0) and side `size` pixels."""

    kind: str
    color: str
    x0: int
    y0: int
    size: int
    rgb: tuple[int, int, int]

    @property
    def center(self) -> tuple[int, int]:
        # Inside all three kinds: the triangle is half its base wide at half its height.
        return self.x0 + self.size // 2, self.y0 + self.size // 2


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything `render` needs, so tests can check answers against what was drawn."""

    image_size: int
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    gradient: tuple[int, int]  # brightness change across the image in x and y (signed, integer levels)


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image (pure integer arithmetic, so pixels are identical on every machine)."""
    n = scene.image_size
    ramp = np.arange(n, dtype=np.int32)
    shade = (ramp[None, :] * scene.gradient[0]) // n + (ramp[:, None] * scene.gradient[1]) // n
    pixels = np.clip(np.asarray(scene.background, np.int32)[None, None, :] + shade[:, :, None], 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x1, y1 = s.x0 + s.size - 1, s.y0 + s.size - 1
        if s.kind == "circle":
            draw.ellipse((s.x0, s.y0, x1, y1), fill=s.rgb)
        elif s.kind == "square":
            draw.rectangle((s.x0, s.y0, x1, y1), fill=s.rgb)
        else:
            draw.polygon([(s.x0 + (s.size - 1) / 2, s.y0), (s.x0, y1), (x1, y1)], fill=s.rgb)
    return image


def _scale(image_size: int, pixels_at_64: int) -> int:
    return max(1, round(pixels_at_64 * image_size / 64))


def _rgb(rng: random.Random, color: str) -> tuple[int, int, int]:
    # Jitter keeps the hue obvious while stopping the model from keying on one exact pixel value.
    return tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[color])


def _sizes(rng: random.Random, image_size: int, count: int, largest: int) -> list[int]:
    return [rng.randint(_scale(image_size, 18), _scale(image_size, largest)) for _ in range(count)]


def _scene(rng: random.Random, image_size: int, specs: Sequence[tuple[str, str]], *, largest: int = 28,
           side: str | Sequence[str | None] | None = None) -> Scene:
    """Place `specs` ((kind, colour) pairs) without overlap; `side` ("left"/"right", or one such entry or None
    per shape) keeps a shape clear of the middle line on that side."""
    margin, gap = _scale(image_size, 2), _scale(image_size, 3)
    sides = [side] * len(specs) if side is None or isinstance(side, str) else list(side)
    while True:  # rejection sampling; shrink the shapes if a crowded draw keeps failing
        sizes = _sizes(rng, image_size, len(specs), largest)
        placed: list[tuple[int, int, int]] = []
        for size, where in zip(sizes, sides):
            lo_x, hi_x = margin, image_size - margin - size
            if where == "left":
                hi_x = image_size // 2 - gap - size
            elif where == "right":
                lo_x = image_size - image_size // 2 + gap
            for _ in range(50):
                x, y = rng.randint(lo_x, hi_x), rng.randint(margin, image_size - margin - size)
                if all(x + size + gap <= px or px + ps + gap <= x or y + size + gap <= py or py + ps + gap <= y
                       for px, py, ps in placed):
                    placed.append((x, y, size))
                    break
            else:
                break
        if len(placed) == len(specs):
            break
        largest = max(18, largest - 2)
    shapes = tuple(Shape(kind, color, x, y, size, _rgb(rng, color)) for (kind, color), (x, y, size)
                   in zip(specs, placed))
    background = tuple(rng.randint(225, 255) for _ in range(3))
    gradient = (rng.randint(-12, 12), rng.randint(-12, 12))
    return Scene(image_size, shapes, background, gradient)


# ------------------------------------------------------------------------------------------------ items
@dataclasses.dataclass
class Item:
    """One conversation before it is written: its question type, turns and the scenes of its images."""

    question_type: str
    turns: list[tuple[str, str]]
    scenes: list[Scene] = dataclasses.field(default_factory=list)

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(a for _, a in self.turns)


def sample_item(rng: random.Random, question_type: str, image_size: int = 64) -> Item:
    """Draw one conversation of `question_type` (one of `QUESTION_TYPES`)."""
    color, kind = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    ask = lambda key, **kw: rng.choice(QUESTIONS[key]).format(**kw)  # noqa: E731
    if question_type in ("color", "shape", "multi_turn"):
        scene = _scene(rng, image_size, [(kind, color)])
        if question_type == "multi_turn":
            turns = [(ask("color"), color), (ask("follow_up_shape"), kind)]
        else:
            turns = [(ask(question_type), color if question_type == "color" else kind)]
        return Item(question_type, turns, [scene])
    if question_type == "count":
        n = rng.randint(1, 3)
        scene = _scene(rng, image_size, [(kind, color)] * n, largest=24)  # three 28-px shapes crowd 64 px
        return Item(question_type, [(ask("count"), NUMBER_WORDS[n - 1])], [scene])
    if question_type == "position":
        side = rng.choice(("left", "right"))
        scene = _scene(rng, image_size, [(kind, color)], largest=24, side=side)
        return Item(question_type, [(ask("position"), side)], [scene])
    if question_type == "two_image":
        other = rng.choice([c for c in sorted(COLORS) if c != color])
        target = rng.randint(0, 1)
        colors = (color, other) if target == 0 else (other, color)
        scenes = [_scene(rng, image_size, [(rng.choice(SHAPES), c)]) for c in colors]
        return Item(question_type, [(ask("two_image", color=color), ("first", "second")[target])], scenes)
    if question_type == "text":
        relation, word, answer = rng.choice(TEXT_FACTS)
        return Item(question_type, [(ask(relation, word=word), answer)])
    raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")


def sample_caption(rng: random.Random, image_size: int = 64) -> tuple[Scene, str]:
    """An image and a caption composed from what it shows: colour, kind and side of each shape, or the count.

    Every caption with one or two kinds of shape names the side of each, so stage 1 has to read where a shape
    is as well as what it is (the questions ask about both)."""
    color, kind = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    style = rng.random()
    if style < 0.55:  # one shape clearly on one side
        side = rng.choice(("left", "right"))
        return _scene(rng, image_size, [(kind, color)], largest=24, side=side), f"a {color} {kind} on the {side}"
    if style < 0.8:
        n = rng.randint(2, 3)
        return (_scene(rng, image_size, [(kind, color)] * n, largest=24),
                f"{NUMBER_WORDS[n - 1]} {color} {kind}s")
    color2 = rng.choice([c for c in sorted(COLORS) if c != color])
    sides = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    scene = _scene(rng, image_size, [(kind, color), (rng.choice(SHAPES), color2)], largest=24, side=sides)
    left, right = sorted(scene.shapes, key=lambda s: s.center[0])
    return scene, f"a {left.color} {left.kind} on the left and a {right.color} {right.kind} on the right"


# -------------------------------------------------------------------------------------------- templates
def parse_templated_text(text: str) -> tuple[list[tuple[str, str]], int]:
    """Inverse of `templated_text`: `(turns, num_images)`."""
    head = SYSTEM + "\n"
    if not text.startswith(head):
        raise ValueError("text does not start with the mPLUG-Owl system sentence")
    rest, num_images, marker = text[len(head):], 0, f"{HUMAN}{IMAGE_MARKER}\n"
    while rest.startswith(marker):
        rest, num_images = rest[len(marker):], num_images + 1
    lines = rest.split("\n")
    if len(lines) % 2 or not all(q.startswith(HUMAN) and a.startswith(AI) for q, a in zip(lines[::2], lines[1::2])):
        raise ValueError("text is not a sequence of 'Human: ...' / 'AI: ...' turns")
    return [(q[len(HUMAN):], a[len(AI):]) for q, a in zip(lines[::2], lines[1::2])], num_images


def _answers(item: Union[Item, Mapping]) -> tuple[str, tuple[str, ...]]:
    if isinstance(item, Item):
        return item.question_type, item.answers
    turns, _ = parse_templated_text(item["text"])
    return item["question_type"], tuple(a for _, a in turns)


def majority_baseline(eval_items: Iterable[Union[Item, Mapping]]) -> dict[str, float]:
    """Per question type, the accuracy of always giving that type's most frequent answer (whole tuple for
    multi-turn conversations). Accepts parsed `eval.jsonl` lines or `Item`s."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for item in eval_items:
        question_type, answers = _answers(item)
        by_type[question_type][answers] += 1
    return {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}


def read_jsonl(path: Union[str, os.PathLike]) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- writing
@dataclasses.dataclass
class SyntheticDataset:
    """Where `generate` wrote everything, and how much. Paths inside the JSONL files are relative to root."""

    root: str
    images_dir: str
    captions: str
    instruct_multimodal: str
    instruct_text: str
    eval: str
    n_captions: int
    n_multimodal: int
    n_text: int
    n_eval: int
    n_images: int
    question_types: tuple[str, ...] = QUESTION_TYPES


def _stream(seed: int, name: str) -> random.Random:
    # String seeds go through SHA-512, so streams are independent and identical across runs and platforms.
    return random.Random(f"owl_jax.synthetic:{seed}:{name}")


class _ImageWriter:
    """Encodes scenes to PNG under images/ and remembers pixel digests to keep eval images out of training."""

    def __init__(self, root: str):
        self.root, self.count = root, 0
        os.makedirs(os.path.join(root, "images"), exist_ok=True)

    def write(self, image: Image.Image, name: str) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rel = f"images/{name}.png"
        with open(os.path.join(self.root, rel), "wb") as f:
            f.write(buffer.getvalue())
        self.count += 1
        return rel


def _digest(image: Image.Image) -> bytes:
    return hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def _write_jsonl(path: str, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _row(item: Item, images: list[str]) -> dict:
    text = templated_text(item.turns, len(images))
    if images:
        return {"image": images, "text": text, "task_type": MULTIMODAL_TASK_TYPE}
    return {"text": text, "task_type": TEXT_TASK_TYPE}


def _clear_images(images_dir: str) -> None:
    # A rerun with smaller counts must not leave stale images of ours behind; other files are left alone.
    if os.path.isdir(images_dir):
        for name in os.listdir(images_dir):
            if name.endswith(".png") and name.split("_", 1)[0] in ("cap", "mm", "eval"):
                os.remove(os.path.join(images_dir, name))


def generate(out_dir: Union[str, os.PathLike], *, seed: int = 0, image_size: int = 64, n_captions: int = 2000,
             n_multimodal: int = 3000, n_text: int = 1000, n_eval_per_type: int = 100) -> SyntheticDataset:
    """Write the synthetic dataset under `out_dir` (see the module docstring); the same seed gives
    byte-identical files.

    Multimodal items are spread evenly (then shuffled) over the slots of `MULTIMODAL_MIX`; eval has
    `n_eval_per_type` items of every type in `QUESTION_TYPES`, drawn from separate seed streams, and no eval
    image is pixel-identical to a training image (text items may repeat training facts: they test instruction
    following from memory).
    """
    root = os.fspath(out_dir)
    images_dir = os.path.join(root, "images")
    _clear_images(images_dir)
    writer = _ImageWriter(root)
    seen: set[bytes] = set()

    rng = _stream(seed, "captions")
    captions = []
    for i in range(n_captions):
        scene, caption = sample_caption(rng, image_size)
        image = render(scene)
        seen.add(_digest(image))
        captions.append({"image": writer.write(image, f"cap_{i:06d}"), "caption": caption})

    rng = _stream(seed, "multimodal")
    types = [MULTIMODAL_MIX[i % len(MULTIMODAL_MIX)] for i in range(n_multimodal)]
    rng.shuffle(types)
    multimodal = []
    for i, question_type in enumerate(types):
        item = sample_item(rng, question_type, image_size)
        paths = []
        for j, scene in enumerate(item.scenes):
            image = render(scene)
            seen.add(_digest(image))
            paths.append(writer.write(image, f"mm_{i:06d}_{j}"))
        multimodal.append(_row(item, paths))

    rng = _stream(seed, "text")
    text = [_row(sample_item(rng, "text"), []) for _ in range(n_text)]

    evaluation = []
    for question_type in QUESTION_TYPES:
        rng = _stream(seed, f"eval:{question_type}")
        for k in range(n_eval_per_type):
            while True:  # redraw the rare item whose image already appears in training
                item = sample_item(rng, question_type, image_size)
                images = [render(s) for s in item.scenes]
                if not seen.intersection(map(_digest, images)):
                    break
            paths = [writer.write(im, f"eval_{question_type}_{k:05d}_{j}") for j, im in enumerate(images)]
            evaluation.append({**_row(item, paths), "question_type": question_type})

    paths = {name: os.path.join(root, f"{name}.jsonl")
             for name in ("captions", "instruct_multimodal", "instruct_text", "eval")}
    counts = {name: _write_jsonl(paths[name], rows) for name, rows in
              (("captions", captions), ("instruct_multimodal", multimodal), ("instruct_text", text),
               ("eval", evaluation))}
    return SyntheticDataset(root=root, images_dir=images_dir, captions=paths["captions"],
                            instruct_multimodal=paths["instruct_multimodal"], instruct_text=paths["instruct_text"],
                            eval=paths["eval"], n_captions=counts["captions"],
                            n_multimodal=counts["instruct_multimodal"], n_text=counts["instruct_text"],
                            n_eval=counts["eval"], n_images=writer.count)
