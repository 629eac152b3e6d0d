"""Prompts + images (+ videos) → model inputs, exactly as the released mPLUG-Owl processors build them.

Text: BOS, then every stretch of text between media markers tokenized on its own without special tokens
(a SentencePiece stretch gets the dummy-prefix space, as in the release; BLOOM's byte-level BPE has none),
every `<image>` replaced by `image_tokens` ids of `IMAGE_TOKEN_ID` (-1) and, in the video layout, every
`<|video|>` by as many ids of `VIDEO_TOKEN_ID` (-2), which the model overwrites with the abstractor's
output; the batch is right-padded with eos. The tokenizer is the checkpoint's `tokenizer.model` (LLaMA) or
`tokenizer.json` (BLOOMZ; see `owl_jax.data.tokenizer`); BLOOM prompts start with its `<s>` too, as the
released processor does although BLOOM itself never adds one.

Two layouts (`LAYOUTS`), from the model config:
- "image" (the `mplug_owl` package): images squashed to S×S; `<|video|>` is ordinary text.
- "video" (the `mplug_owl_video` package): images and video frames get CLIP's shortest-edge resize and
  centre crop (`owl_jax.data.pixels`); videos are sampled and read as `owl_jax.data.video` describes, and
  the output gains `video_pixel_values` (V, 3, T, S, S).

Deliberate differences, none of which change the released outputs for ordinary prompts and RGB images:
literal "<s>"/"</s>" in text stay text, back-to-back identical markers (`<image><image>`) are an error
(the release silently merged them into one run), images are converted to RGB before resizing (the
release resized first), and images and videos may be given together (the released video processor
then dropped the videos).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from owl_jax.data import video as video_io
from owl_jax.data.images import ImageBudget, decode_image
from owl_jax.data.pixels import CLIP_MEAN, CLIP_STD, Normalizer, resize
from owl_jax.data.prompt_ids import encode_prompt, marker_pattern
from owl_jax.data.prompts import IMAGE_MARKER, VIDEO_MARKER, count_images, count_videos
from owl_jax.data.tokenizer import (
    FAST_TOKENIZER_FILE,
    TOKENIZER_FILE,
    find_tokenizer,
    find_tokenizer_file,
    load_tokenizer,
    plain_decoder,
)

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGE_TOKEN_ID", "LAYOUTS", "OwlProcessor", "VIDEO_TOKEN_ID", "find_tokenizer"]

IMAGE_TOKEN_ID = -1  # placeholder id the model replaces with image embeddings
VIDEO_TOKEN_ID = -2  # placeholder id the video model replaces with video embeddings
LAYOUTS = ("image", "video")

ImageInput = Image.Image | str | os.PathLike | np.ndarray
VideoInput = str | os.PathLike | np.ndarray


def layout_of(config: Any) -> str:
    """The processor layout an `OwlConfig` asks for: "video" when `config.video` (the video model), else "image"."""
    return "video" if getattr(config, "video", False) else "image"


class OwlProcessor:
    """Tokenizer + image (and video) preprocessor for mPLUG-Owl.

    Args:
      tokenizer_path_or_dir: a `tokenizer.model` or `tokenizer.json`, or a folder holding one (see
        `owl_jax.data.tokenizer.load_tokenizer`).
      image_size: side S of the square images the ViT sees (`config.vision.image_size`).
      image_tokens: LLM positions per image and per video (`config.image_tokens` = num_query_tokens + 1;
        65 released).
      image_mean, image_std: per-channel normalization (CLIP's by default).
      max_image_pixels: image files with more pixels than this are refused before decoding (decompression
        bombs); in-memory images are trusted. Files follow `owl_jax.data.images.ImageBudget`'s other limits.
      layout: "image" or "video" (`LAYOUTS`; see the module docstring).
      video_backend: how video files are read: "auto", "decord" or "pyav" (`owl_jax.data.video.read_frames`).
    """

    def __init__(
        self,
        tokenizer_path_or_dir: str | os.PathLike,
        image_size: int = 224,
        image_tokens: int = 65,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_image_pixels: int = 89_478_485,
        layout: str = "image",
        video_backend: str = "auto",
    ):
        if image_size <= 0 or image_tokens <= 0:
            raise ValueError(f"image_size and image_tokens must be positive, got {image_size}, {image_tokens}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        if video_backend not in video_io.BACKENDS:
            raise ValueError(f"video_backend {video_backend!r} is not one of {video_io.BACKENDS}")
        self.tokenizer = load_tokenizer(tokenizer_path_or_dir)
        self._vocab_size = len(self.tokenizer)
        self._plain_decode = plain_decoder(self.tokenizer)
        self.image_size = int(image_size)
        self.image_tokens = int(image_tokens)
        self.layout = layout
        self.video_backend = video_backend
        self.max_image_pixels = int(max_image_pixels)
        self.image_budget = ImageBudget(max_pixels=self.max_image_pixels)
        self.normalize = Normalizer(image_mean, image_std)
        self._resize = "shortest_edge_crop" if layout == "video" else "squash"
        self._marker_ids = {IMAGE_MARKER: IMAGE_TOKEN_ID}
        if layout == "video":
            self._marker_ids[VIDEO_MARKER] = VIDEO_TOKEN_ID
        self._split = marker_pattern(self._marker_ids)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, config: Any = None, **kwargs: Any) -> OwlProcessor:
        """A processor for the checkpoint in `folder`.

        Args:
          folder: holds `tokenizer.model` or `tokenizer.json` (FileNotFoundError if it holds neither).
          config: an `OwlConfig` giving `image_size`, `image_tokens` and the layout (`layout_of`). When None
            and `folder` has a released `config.json`, that is read, so the image token count always matches
            the weights.
          kwargs: passed to the constructor (they override the config).
        """
        if find_tokenizer_file(folder) is None:
            raise FileNotFoundError(
                f"{os.fspath(folder)!r} has no {TOKENIZER_FILE} or {FAST_TOKENIZER_FILE}; pass the folder of the "
                "released checkpoint or the tokenizer file itself"
            )
        if config is None and os.path.isfile(os.path.join(os.fspath(folder), "config.json")):
            from owl_jax.config import OwlConfig

            config = OwlConfig.from_hf_config(folder)
        if config is not None:
            kwargs.setdefault("image_size", config.vision.image_size)
            kwargs.setdefault("image_tokens", config.image_tokens)
            kwargs.setdefault("layout", layout_of(config))
        return cls(folder, **kwargs)

    # --------------------------------------------------------------------------------------------- text
    @property
    def bos_token_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """The release pads with eos (not the config's pad id 0); padded positions are masked out anyway."""
        return self.tokenizer.eos_token_id

    def encode_prompt(self, prompt: str) -> list[int]:
        """Ids of one prompt (length L_i, no padding): BOS, text chunks, and `image_tokens` placeholders per marker."""
        return encode_prompt(
            prompt,
            lambda text: self.tokenizer.encode(text, add_special_tokens=False),
            bos_id=self.bos_token_id,
            marker_ids=self._marker_ids,
            run_length=self.image_tokens,
            split=self._split,
        )

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids (shape (L,)).

        Media placeholders (negative ids) are always dropped. Ids the tokenizer does not have (a model's
        spare vocabulary rows: BLOOMZ-7b has 250880 rows for 250680 tokens) decode as the unknown token:
        nothing when special tokens are skipped (the default), `<unk>` otherwise; they are dropped when the
        tokenizer has no unknown token.
        """
        vocab, unk = self._vocab_size, self.tokenizer.unk_token_id
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if i >= 0]
        ids = [i if i < vocab else unk for i in ids if i < vocab or unk is not None]
        if skip_special_tokens and self._plain_decode is not None:
            return self._plain_decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def batch_decode(self, ids: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` of each row of `ids` (shape (B, L), or a list of sequences)."""
        return [self.decode(row, skip_special_tokens) for row in ids]

    # ------------------------------------------------------------------------------------------- images
    def load_image(self, image: ImageInput) -> Image.Image:
        """One image as an RGB PIL image: a PIL image, a file path, or a uint8 array (H, W), (H, W, 1|3|4).

        Files are decoded within `image_budget` (`owl_jax.data.images`): exactly when their sides are
        at most its working side, shrunk while decoding otherwise. Raises ValueError (an ImageError)
        naming the file for unreadable files and files too large to decode.
        """
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, np.ndarray):
            channels = image.shape[2] if image.ndim == 3 else 1
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
                raise ValueError(f"image arrays must be uint8 (H, W) or (H, W, 1|3|4), got {image.dtype} {image.shape}")
            return Image.fromarray(image[..., 0] if image.ndim == 3 and channels == 1 else image).convert("RGB")
        if isinstance(image, (str, os.PathLike)):
            return decode_image(image, self.image_budget, name=f"image {os.fspath(image)!r}")
        raise TypeError(f"unsupported image type {type(image).__name__}; pass a PIL image, a path or a uint8 array")

    def preprocess_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Pixel values (N, 3, S, S) float32 for N images, in order; (0, 3, S, S) for none.

        The image layout squashes each image to S×S (as the release resizes before its CLIP processor sees
        the image); the video layout resizes the shortest edge to S and crops the centre.
        """
        s = self.image_size
        out = np.empty((len(images), 3, s, s), np.float32)
        for n, image in enumerate(images):
            # The release resized before converting to RGB; for RGB inputs that is the same, and converting
            # first keeps palette images off PIL's nearest-neighbour path.
            out[n] = self.normalize(resize(self.load_image(image), s, self._resize))
        return out

    # ------------------------------------------------------------------------------------------- videos
    def preprocess_video(self, video: VideoInput, num_frames: int = 4) -> np.ndarray:
        """One video → (T, 3, S, S) float32.

        `video` is a file (read with `owl_jax.data.video.read_frames`: T = num_frames frames at 224×224) or
        the frames already read, a uint8 array (T, H, W, 3) taken as it is (num_frames is then not used).
        Each frame gets the video layout's CLIP steps. Raises VideoError/ValueError naming the file.
        """
        if isinstance(video, np.ndarray):
            frames = video_io.check_frames(video, name=f"video array of shape {video.shape}")
        elif isinstance(video, (str, os.PathLike)):
            frames = video_io.read_frames(video, num_frames, backend=self.video_backend)
        else:
            raise TypeError(f"unsupported video type {type(video).__name__}; pass a path or a uint8 (T, H, W, 3) array")
        s = self.image_size
        return np.stack([self.normalize(resize(Image.fromarray(f), s, "shortest_edge_crop")) for f in frames])

    def preprocess_videos(self, videos: Sequence[VideoInput], num_frames: int = 4) -> np.ndarray:
        """Video pixel values (V, 3, T, S, S) float32 for V videos, in order; (0, 3, T, S, S) for none."""
        per_video = [self.preprocess_video(v, num_frames) for v in videos]
        return video_io.stack_videos(per_video, num_frames, self.image_size)

    # -------------------------------------------------------------------------------------------- batch
    def __call__(
        self,
        prompts: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | None = None,
        videos: VideoInput | Sequence[VideoInput] | None = None,
        num_frames: int = 4,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Model inputs for a batch of B prompts.

        Args:
          prompts: one prompt or B prompts (see `owl_jax.data.prompts.build_prompt`).
          images: the N images for all `<image>` markers, in prompt order across the batch (one image may be
            passed bare). N must equal the total marker count.
          videos: (video layout) the V videos for all `<|video|>` markers, in prompt order across the batch:
            file paths, or uint8 frame arrays (T, H, W, 3). One video may be passed bare.
          num_frames: T, frames sampled per video file (at least 2).
          max_length: pad to this length L (ValueError if a prompt is longer: truncating could cut an image).
          pad_to_multiple_of: round L up to a multiple of this (fewer recompilations under jit).

        Returns:
          `input_ids` (B, L) int32 with -1 at image and -2 at video positions and eos padding on the right,
          `attention_mask` (B, L) int32 (1 real, 0 padding), `pixel_values` (N, 3, S, S) float32, and in
          the video layout `video_pixel_values` (V, 3, T, S, S) float32.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        images = _as_list(images, (Image.Image, str, os.PathLike, np.ndarray), stack_ndim=4)
        videos = _as_list(videos, (str, os.PathLike, np.ndarray), stack_ndim=5)
        if videos and self.layout != "video":
            raise ValueError(
                f"{len(videos)} videos were given, but this processor serves the image layout; "
                "load a video checkpoint (its config) or pass layout='video'"
            )
        media = [(IMAGE_MARKER, "images", count_images, images)]
        if self.layout == "video":
            if videos:  # fail before any decoding
                first = videos[0]
                video_io.check_num_frames(
                    num_frames, "video arrays" if isinstance(first, np.ndarray) else f"video {os.fspath(first)!r}"
                )
            media.append((VIDEO_MARKER, "videos", count_videos, videos))
        for marker, what, count, given in media:
            counts = [count(p) for p in prompts]
            if sum(counts) != len(given):
                raise ValueError(
                    f"the prompts have {sum(counts)} {marker} markers (per prompt: {counts}) "
                    f"but {len(given)} {what} were given"
                )

        encoded = [self.encode_prompt(p) for p in prompts]
        length = max(len(ids) for ids in encoded)
        if max_length is not None:
            if length > max_length:
                raise ValueError(f"a prompt has {length} tokens, more than max_length={max_length}")
            length = max_length
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = np.full((len(encoded), length), self.pad_token_id, np.int32)
        attention_mask = np.zeros((len(encoded), length), np.int32)
        for b, ids in enumerate(encoded):
            input_ids[b, : len(ids)] = ids
            attention_mask[b, : len(ids)] = 1
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.preprocess_images(images),
        }
        if self.layout == "video":
            out["video_pixel_values"] = self.preprocess_videos(videos, num_frames)
        return out


def _as_list(items: Any, single: tuple[type, ...], stack_ndim: int) -> list:
    """`items` as a list: None → [], one bare item → [item]; an array of `stack_ndim` dims is a stack."""
    if items is None:
        return []
    if isinstance(items, single) and not (isinstance(items, np.ndarray) and items.ndim == stack_ndim):
        return [items]
    return list(items)
