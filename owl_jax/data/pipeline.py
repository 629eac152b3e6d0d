"""Training input pipeline on grain: prepared ArrayRecord shards → fixed-shape batches.

Per source: `MapDataset.source` → this process's slice → seeded shuffle (reshuffled every epoch) → repeat →
decode, augment and tokenize (`ExampleTransform`). Stage 2 mixes the text-only and multimodal sources half
and half (`MapDataset.mix` alternates them, so every even batch is exactly half each). Batches have static
shapes: `seq_len` tokens and `max_images` image slots per row with an image mask.

A record that cannot be used (undecodable, broken image, too many images, no answer left after
truncation) becomes a fully masked row with its reason code in `skipped`: it trains on nothing, keeps
shapes static, and is counted exactly by the training loop, which stops once the skipped fraction passes
the configured threshold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from owl_jax.data.conversation import tokenize_conversation
from owl_jax.data.images import ImageError, decode_image
from owl_jax.data.pixels import resize
from owl_jax.data.prompts import templated_text
from owl_jax.data.records import Example, RecordError, find_shards

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
SKIP_REASONS = {
    0: "ok",
    1: "undecodable record",
    2: "broken image",
    3: "no answer tokens after truncation",
    4: "more images than max_images",
}


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    seq_len: int
    max_images: int
    image_size: int
    image_tokens: int
    augment: bool = False
    min_crop_scale: float = 0.5
    flip: bool = True
    drop_images: bool = False  # train on the conversation text alone (e.g. language-model pretraining)
    resize: str = "squash"  # un-augmented images: "squash" (image layout) or "shortest_edge_crop" (video layout)
    tokenization: str = "released"  # or "prompt" (`owl_jax.data.conversation.tokenize_conversation`)
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0


def random_resized_crop(
    image: Image.Image, rng: np.random.Generator, size: int, scale: tuple[float, float]
) -> Image.Image:
    """Crop a random area fraction in `scale` with aspect ratio in [3/4, 4/3], resize (bicubic) to `size`."""
    w, h = image.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return image.resize((size, size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    side = min(w, h)  # fallback: the central square
    x, y = (w - side) // 2, (h - side) // 2
    return image.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side))


def normalize(image: Image.Image) -> np.ndarray:
    """RGB PIL image → `(3, H, W)` float32 with CLIP mean/std (the processor's arithmetic)."""
    x = (np.asarray(image, np.float64) * (1 / 255)).astype(np.float32)
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


class ExampleTransform:
    """Record bytes (+ a numpy Generator from grain) → one fixed-shape training row.

    The tokenizer is loaded lazily so the transform pickles cheaply into grain worker processes.
    """

    def __init__(self, spec: PipelineSpec, tokenizer_path: str):
        self.spec = spec
        self.tokenizer_path = tokenizer_path
        self._tokenizer = None

    def _encode(self, text: str) -> list[int]:
        if self._tokenizer is None:
            from owl_jax.data.processor import OwlProcessor

            self._tokenizer = OwlProcessor(
                self.tokenizer_path, image_size=self.spec.image_size, image_tokens=self.spec.image_tokens
            ).tokenizer
        return self._tokenizer.encode(text, add_special_tokens=False)

    def empty(self, reason: int) -> dict[str, np.ndarray]:
        s = self.spec
        return {
            "input_ids": np.full(s.seq_len, s.pad_id, np.int32),
            "attention_mask": np.zeros(s.seq_len, np.int32),
            "loss_mask": np.zeros(s.seq_len - 1, np.int32),
            "pixel_values": np.zeros((s.max_images, 3, s.image_size, s.image_size), np.float32),
            "image_mask": np.zeros(s.max_images, np.int32),
            "skipped": np.int32(reason),
        }

    def __call__(self, record: bytes, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        s = self.spec
        try:
            example = Example.from_bytes(record).validate()
        except RecordError:
            return self.empty(1)
        if s.drop_images:
            example = dataclasses.replace(example, images=[], task="text")
        if len(example.images) > s.max_images:
            return self.empty(4)
        try:
            images = [decode_image(b) for b in example.images]
        except ImageError:  # corrupt, or too large to decode within the budget
            return self.empty(2)
        tokens = tokenize_conversation(
            templated_text(example.turns, len(images)),
            self._encode,
            seq_len=s.seq_len,
            image_tokens=s.image_tokens,
            bos_id=s.bos_id,
            eos_id=s.eos_id,
            pad_id=s.pad_id,
            tokenization=s.tokenization,
        )
        if not tokens.loss_mask.any():
            return self.empty(3)
        row = self.empty(0)
        for slot, image in enumerate(images[: tokens.num_images]):
            if s.augment and rng is not None:
                image = random_resized_crop(image, rng, s.image_size, (s.min_crop_scale, 1.0))
                if s.flip and rng.random() < 0.5:
                    image = image.transpose(Image.FLIP_LEFT_RIGHT)
            else:
                image = resize(image, s.image_size, s.resize)  # the layout's processor resize
            row["pixel_values"][slot] = normalize(image)
            row["image_mask"][slot] = 1
        row.update(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, loss_mask=tokens.loss_mask)
        return row


def source_dataset(
    paths: Sequence[str], transform: ExampleTransform, *, seed: int, shuffle: bool = True, repeat: bool = True
):
    """One prepared dataset as a grain `MapDataset` of rows in one global order (every process alike)."""
    import grain

    files: list[str] = []
    for p in paths:
        files += find_shards(p)
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    # The transform's random stream is keyed by the global index, so augmentation does not depend on
    # how many processes share the work.
    return ds.random_map(transform, seed=seed) if shuffle else ds.map(transform)


def _process_rows(parent, rows_per_process: int, process_index: int, process_count: int):
    """This process's part of every global batch: local row j of batch k is global row
    `k·R·P + p·R + j` (R rows per process, P processes), so the global batch assembled from all processes'
    rows in process order is the same whatever P is."""
    import grain

    class ProcessRows(grain.MapDataset):
        def __len__(self) -> int:
            return len(parent) // process_count

        def _global_index(self, index: int) -> int:
            batch, row = divmod(index, rows_per_process)
            return (batch * process_count + process_index) * rows_per_process + row

        def __getitem__(self, index):
            if isinstance(index, slice):
                return self.slice(index)
            return parent[self._global_index(index)]

    return ProcessRows(parent)


def training_batches(
    sources: Sequence[Sequence[str]],
    transform: ExampleTransform,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """Infinite local batches of `batch_size / process_count` rows; several sources mix in equal parts.

    Returns a grain `IterDataset`; its iterator's `get_state()` / `set_state()` resume the exact order.
    """
    import grain

    if batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} processes")
    datasets = [source_dataset(paths, transform, seed=seed + 1000 * i) for i, paths in enumerate(sources)]
    if len(datasets) > 1 and batch_size % len(datasets):
        raise ValueError(f"batch size {batch_size} must be a multiple of the {len(datasets)} mixed sources")
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, [1.0] * len(datasets))
    local = batch_size // process_count
    if process_count > 1:
        ds = _process_rows(ds, local, process_index, process_count)
    return ds.to_iter_dataset().batch(local, drop_remainder=True)


def evaluation_rows(
    paths: Sequence[str], transform: ExampleTransform, *, batch_size: int
) -> tuple[list[Any], list[Example]]:
    """Every example of the held-out shards once, in order, as padded batches, and the examples themselves."""
    from owl_jax.data.records import read_examples

    files: list[str] = []
    for p in paths:
        files += find_shards(p)
    examples = list(read_examples(files))
    rows = [transform(e.to_bytes()) for e in examples]
    rows += [transform.empty(0)] * (-len(rows) % batch_size)
    batches = [
        {k: np.stack([r[k] for r in rows[i : i + batch_size]]) for k in rows[0]}
        for i in range(0, len(rows), batch_size)
    ]
    return batches, examples
