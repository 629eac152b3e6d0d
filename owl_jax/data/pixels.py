"""Pixels the ViT sees: the two resizes of the released packages, then CLIP's rescale and normalization.

- The image package (`mplug_owl`) squashes every image to S×S with PIL bicubic (no crop).
- The video package (`mplug_owl_video`) runs CLIP's own steps on images and video frames alike: the
  shortest edge to S with PIL bicubic (the other edge `int(S · long / short)`; an image whose shortest
  edge is already S is not resized), then the centre S×S crop (offsets rounded down).

Both then divide by 255 (in float64, cast to float32, as CLIP's rescale does) and normalize with the
per-channel mean and std in float32, which reproduces the released values exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZES = ("squash", "shortest_edge_crop")


def squash(image: Image.Image, size: int) -> np.ndarray:
    """The image package's resize: an RGB image → (size, size, 3) uint8, aspect ratio not kept."""
    return np.asarray(image.resize((size, size), Image.BICUBIC))


def shortest_edge_crop(image: Image.Image, size: int) -> np.ndarray:
    """CLIP's resize and centre crop: an RGB image (W, H) → (size, size, 3) uint8."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short != size:
        other = int(size * long / short)
        image = image.resize((size, other) if width <= height else (other, size), Image.BICUBIC)
    pixels = np.asarray(image)
    # Both sides are now at least size: int(size * long / short) >= size because long >= short.
    top, left = (pixels.shape[0] - size) // 2, (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


class Normalizer:
    """uint8 (H, W, 3) pixels → float32 (3, H, W): /255, then (x - mean) / std per channel."""

    def __init__(self, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        # float32 like the released CLIP normalization, so the output matches it bit for bit.
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        # CLIP's rescale multiplies in float64 then casts; normalizing in float32 matches it exactly.
        x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        return ((x - self.mean) / self.std).transpose(2, 0, 1)


def resize(image: Image.Image, size: int, how: str) -> np.ndarray:
    """`squash` or `shortest_edge_crop` (`how`, one of `RESIZES`) of an RGB image → (size, size, 3) uint8."""
    if how == "squash":
        return squash(image, size)
    if how == "shortest_edge_crop":
        return shortest_edge_crop(image, size)
    raise ValueError(f"resize {how!r} is not one of {RESIZES}")
