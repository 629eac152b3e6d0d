"""A synthetic shapes dataset that a tiny mPLUG-Owl can learn on a CPU in minutes.

`python train.py` without arguments trains both stages on data made here, so the data has to be learnable
quickly by a tiny ViT and LLaMA (flat colours, large shapes, one-word answers), varied enough that held-out
accuracy means something (random placement, sizes, colour jitter, background tint, 3 phrasings per
question), and cheap and deterministic to make (PIL drawing on 64x64 pixels, string-seeded RNG streams).

The scenes and questions are drawn in `synthetic_scenes`; this module writes them in the project's real
source formats, so training goes through the same prepare path as real data:

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
from collections.abc import Iterable, Mapping

from PIL import Image

from owl_jax.data.prompts import AI, HUMAN, IMAGE_MARKER, SYSTEM, templated_text
from owl_jax.data.synthetic_scenes import (
    MULTIMODAL_MIX,
    MULTIMODAL_TASK_TYPE,
    QUESTION_TYPES,
    TEXT_TASK_TYPE,
    Item,
    render,
    sample_caption,
    sample_item,
)


# -------------------------------------------------------------------------------------------- templates
def parse_templated_text(text: str) -> tuple[list[tuple[str, str]], int]:
    """Inverse of `templated_text`: `(turns, num_images)`."""
    head = SYSTEM + "\n"
    if not text.startswith(head):
        raise ValueError("text does not start with the mPLUG-Owl system sentence")
    rest, num_images, marker = text[len(head) :], 0, f"{HUMAN}{IMAGE_MARKER}\n"
    while rest.startswith(marker):
        rest, num_images = rest[len(marker) :], num_images + 1
    lines = rest.split("\n")
    if len(lines) % 2 or not all(q.startswith(HUMAN) and a.startswith(AI) for q, a in zip(lines[::2], lines[1::2])):
        raise ValueError("text is not a sequence of 'Human: ...' / 'AI: ...' turns")
    return [(q[len(HUMAN) :], a[len(AI) :]) for q, a in zip(lines[::2], lines[1::2])], num_images


def _answers(item: Item | Mapping) -> tuple[str, tuple[str, ...]]:
    if isinstance(item, Item):
        return item.question_type, item.answers
    turns, _ = parse_templated_text(item["text"])
    return item["question_type"], tuple(a for _, a in turns)


def majority_baseline(eval_items: Iterable[Item | Mapping]) -> dict[str, float]:
    """Per question type, the accuracy of always giving that type's most frequent answer (whole tuple for
    multi-turn conversations). Accepts parsed `eval.jsonl` lines or `Item`s."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for item in eval_items:
        question_type, answers = _answers(item)
        by_type[question_type][answers] += 1
    return {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}


def read_jsonl(path: str | os.PathLike) -> list[dict]:
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


def generate(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 64,
    n_captions: int = 2000,
    n_multimodal: int = 3000,
    n_text: int = 1000,
    n_eval_per_type: int = 100,
) -> SyntheticDataset:
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

    paths = {
        name: os.path.join(root, f"{name}.jsonl")
        for name in ("captions", "instruct_multimodal", "instruct_text", "eval")
    }
    counts = {
        name: _write_jsonl(paths[name], rows)
        for name, rows in (
            ("captions", captions),
            ("instruct_multimodal", multimodal),
            ("instruct_text", text),
            ("eval", evaluation),
        )
    }
    return SyntheticDataset(
        root=root,
        images_dir=images_dir,
        captions=paths["captions"],
        instruct_multimodal=paths["instruct_multimodal"],
        instruct_text=paths["instruct_text"],
        eval=paths["eval"],
        n_captions=counts["captions"],
        n_multimodal=counts["instruct_multimodal"],
        n_text=counts["instruct_text"],
        n_eval=counts["eval"],
        n_images=writer.count,
    )
