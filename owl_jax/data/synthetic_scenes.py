"""The synthetic dataset's vocabulary, scenes and questions: what `synthetic.generate` draws and writes.

Flat colours, large shapes and one-word answers, so a tiny ViT and LLaMA learn them on a CPU in minutes;
random placement, sizes, colour jitter, background tint and three phrasings per question, so held-out
accuracy means something. Drawing is integer arithmetic on PIL images and every draw comes from the
`random.Random` passed in, so the same seed gives the same pixels on every machine.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Pure-ish hues far apart in RGB, so a 16-px patch embedding separates them after a few hundred steps.
COLORS = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 70, 215), "yellow": (235, 200, 25)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Every word appears once, so "opposite of X" has one answer in both directions.
OPPOSITES = (
    ("up", "down"),
    ("big", "small"),
    ("hot", "cold"),
    ("open", "closed"),
    ("day", "night"),
    ("fast", "slow"),
    ("old", "new"),
    ("happy", "sad"),
    ("light", "dark"),
    ("in", "out"),
    ("yes", "no"),
    ("wet", "dry"),
)

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
    "position": (
        "Is the shape on the left or the right?",
        "Which side is the shape on, left or right?",
        "Where is the shape, on the left or on the right?",
    ),
    "two_image": (
        "Which picture shows a {color} shape, the first or the second?",
        "Which image has a {color} shape, first or second?",
        "Is the {color} shape in the first or the second picture?",
    ),
    "follow_up_shape": ("What shape is it?", "And which shape is it?", "What shape is in the picture?"),
    "opposite": (
        "What is the opposite of {word}?",
        "Give the opposite of {word}.",
        "Name the opposite of the word {word}.",
    ),
    "after": ("What number comes after {word}?", "Which number follows {word}?", "What comes next after {word}?"),
}
TEXT_FACTS = (
    tuple(("opposite", a, b) for a, b in OPPOSITES)
    + tuple(("opposite", b, a) for a, b in OPPOSITES)
    + tuple(("after", NUMBER_WORDS[i], NUMBER_WORDS[i + 1]) for i in range(len(NUMBER_WORDS) - 1))
)

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


def _scene(
    rng: random.Random,
    image_size: int,
    specs: Sequence[tuple[str, str]],
    *,
    largest: int = 28,
    side: str | Sequence[str | None] | None = None,
) -> Scene:
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
                if all(
                    x + size + gap <= px or px + ps + gap <= x or y + size + gap <= py or py + ps + gap <= y
                    for px, py, ps in placed
                ):
                    placed.append((x, y, size))
                    break
            else:
                break
        if len(placed) == len(specs):
            break
        largest = max(18, largest - 2)
    shapes = tuple(
        Shape(kind, color, x, y, size, _rgb(rng, color)) for (kind, color), (x, y, size) in zip(specs, placed)
    )
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
        return (_scene(rng, image_size, [(kind, color)] * n, largest=24), f"{NUMBER_WORDS[n - 1]} {color} {kind}s")
    color2 = rng.choice([c for c in sorted(COLORS) if c != color])
    sides = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    scene = _scene(rng, image_size, [(kind, color), (rng.choice(SHAPES), color2)], largest=24, side=sides)
    left, right = sorted(scene.shapes, key=lambda s: s.center[0])
    return scene, f"a {left.color} {left.kind} on the left and a {right.color} {right.kind} on the right"
