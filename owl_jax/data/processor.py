"""Prompts + images → model inputs, exactly as the released mPLUG-Owl processor builds them.

Text: BOS, then every stretch of text between `<image>` markers tokenized on its own (so each stretch gets
SentencePiece's dummy-prefix space, as in the release), every `<image>` replaced by `image_tokens` ids of
`IMAGE_TOKEN_ID` (-1) that the model overwrites with the abstractor's output, and the batch right-padded
with eos. Images: an RGB squash to `image_size`² with PIL bicubic, then CLIP's rescale and normalization.

Deliberate differences, none of which change the released outputs for ordinary prompts and RGB images:
literal "<s>"/"</s>" in text stay text, back-to-back `<image><image>` is an error (the release silently
merged them), and images are converted to RGB before resizing (the release resized first).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from owl_jax.data.images import ImageBudget, decode_image
from owl_jax.data.prompts import IMAGE_MARKER, count_images

IMAGE_TOKEN_ID = -1  # placeholder id the model replaces with image embeddings
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOKENIZER_FILE = "tokenizer.model"

ImageInput = Image.Image | str | os.PathLike | np.ndarray


class _LegacyLlamaTokenizer(SentencePieceBackend):
    """The LLaMA SentencePiece model with the legacy (transformers 4.28) encoding the release used.

    transformers 5's `LlamaTokenizer` (tokenizers backend) gives different ids; this plain sentencepiece path
    gives the released ones. Only decoding is changed: the base class joins pieces as text, which prints
    byte-fallback pieces (non-Latin text) as `<0xE6>`; sentencepiece itself turns them back into UTF-8.
    """

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        specials = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in specials:
                # Spacing as the 4.28 slow LLaMA tokenizer: a text run that ends at a special token gets one
                # space in front of it ("<s> Hi</s>"); this only shows with skip_special_tokens=False.
                if run:
                    out.append(" ")
                out += [self.sp_model.decode_pieces(run), token]
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run))
        return "".join(out)


def find_tokenizer(folder: str | os.PathLike) -> str | None:
    """Path of the SentencePiece `tokenizer.model` in `folder` (or `folder` itself if it is that file), else None."""
    folder = os.fspath(folder)
    if os.path.isfile(folder) and folder.endswith(".model"):
        return folder
    path = os.path.join(folder, TOKENIZER_FILE)
    return path if os.path.isfile(path) else None


class OwlProcessor:
    """Tokenizer + image preprocessor for mPLUG-Owl.

    Args:
      tokenizer_path_or_dir: a SentencePiece `tokenizer.model`, or a folder holding one.
      image_size: side S of the square images the ViT sees (`config.vision.image_size`).
      image_tokens: LLM positions per image (`config.image_tokens` = num_query_tokens + 1; 65 released).
      image_mean, image_std: per-channel normalization (CLIP's by default).
      max_image_pixels: image files with more pixels than this are refused before decoding (decompression
        bombs); in-memory images are trusted. Files follow `owl_jax.data.images.ImageBudget`'s other limits.
    """

    def __init__(
        self,
        tokenizer_path_or_dir: str | os.PathLike,
        image_size: int = 224,
        image_tokens: int = 65,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        max_image_pixels: int = 89_478_485,
    ):
        path = find_tokenizer(tokenizer_path_or_dir)
        if path is None:
            raise FileNotFoundError(f"no SentencePiece {TOKENIZER_FILE} at {os.fspath(tokenizer_path_or_dir)!r}")
        if image_size <= 0 or image_tokens <= 0:
            raise ValueError(f"image_size and image_tokens must be positive, got {image_size}, {image_tokens}")
        # split_special_tokens: a literal "</s>" or "<s>" in user text is spelled out as ordinary pieces instead
        # of becoming a control id, so text cannot end a sequence early or fake a new one. Text without those
        # strings tokenizes exactly as in the release.
        self.tokenizer = _LegacyLlamaTokenizer(
            vocab_file=path, bos_token="<s>", eos_token="</s>", unk_token="<unk>", split_special_tokens=True
        )
        self.image_size = int(image_size)
        self.image_tokens = int(image_tokens)
        self.max_image_pixels = int(max_image_pixels)
        self.image_budget = ImageBudget(max_pixels=self.max_image_pixels)
        # float32 like the released CLIP normalization, so the output matches it bit for bit.
        self._mean = np.asarray(image_mean, np.float32).reshape(1, 1, 3)
        self._std = np.asarray(image_std, np.float32).reshape(1, 1, 3)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, config: Any = None, **kwargs: Any) -> OwlProcessor:
        """A processor for the checkpoint in `folder`.

        Args:
          folder: holds `tokenizer.model` (FileNotFoundError if it does not).
          config: an `OwlConfig` giving `image_size` and `image_tokens`. When None and `folder` has a
            released `config.json`, that is read, so the image token count always matches the weights.
          kwargs: passed to the constructor (they override the config).
        """
        path = find_tokenizer(folder)
        if path is None:
            raise FileNotFoundError(
                f"{os.fspath(folder)!r} has no {TOKENIZER_FILE}; pass the folder of the "
                "released checkpoint or the tokenizer file itself"
            )
        if config is None and os.path.isfile(os.path.join(os.fspath(folder), "config.json")):
            from owl_jax.config import OwlConfig

            config = OwlConfig.from_hf_config(folder)
        if config is not None:
            kwargs.setdefault("image_size", config.vision.image_size)
            kwargs.setdefault("image_tokens", config.image_tokens)
        return cls(path, **kwargs)

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
        """Ids of one prompt (length L_i, no padding): BOS, text chunks, and `image_tokens` × -1 per `<image>`."""
        chunks = prompt.split(IMAGE_MARKER)
        ids = [self.bos_token_id]
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids += [IMAGE_TOKEN_ID] * self.image_tokens
            if chunk:
                ids += self.tokenizer.encode(chunk, add_special_tokens=False)
            elif 0 < i < len(chunks) - 1:
                # Two images back to back would form one run of -1s that the model cannot split into images.
                raise ValueError(
                    f"adjacent {IMAGE_MARKER}{IMAGE_MARKER} markers in prompt {prompt[:80]!r}...: "
                    "put text (e.g. a newline) between images"
                )
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of one sequence of ids (shape (L,)); image placeholders (negative ids) are always dropped."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if i >= 0]
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
        """Pixel values (N, 3, S, S) float32 for N images, in order; (0, 3, S, S) for none."""
        s = self.image_size
        out = np.empty((len(images), 3, s, s), np.float32)
        for n, image in enumerate(images):
            # A squash to S×S (no crop), as the release resizes before its CLIP processor sees the image.
            # The release resized before converting to RGB; for RGB inputs that is the same, and converting
            # first keeps palette images off PIL's nearest-neighbour path.
            pixels = np.asarray(self.load_image(image).resize((s, s), Image.BICUBIC))
            # CLIP's rescale multiplies in float64 then casts; normalizing in float32 matches it exactly.
            x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
            out[n] = ((x - self._mean) / self._std).transpose(2, 0, 1)
        return out

    # -------------------------------------------------------------------------------------------- batch
    def __call__(
        self,
        prompts: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput] | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Model inputs for a batch of B prompts.

        Args:
          prompts: one prompt or B prompts (see `owl_jax.data.prompts.build_prompt`).
          images: the N images for all `<image>` markers, in prompt order across the batch (one image may be
            passed bare). N must equal the total marker count.
          max_length: pad to this length L (ValueError if a prompt is longer: truncating could cut an image).
          pad_to_multiple_of: round L up to a multiple of this (fewer recompilations under jit).

        Returns:
          `input_ids` (B, L) int32 with -1 at image positions and eos padding on the right,
          `attention_mask` (B, L) int32 (1 real, 0 padding), `pixel_values` (N, 3, S, S) float32.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if images is None:
            images = []
        elif isinstance(images, (Image.Image, str, os.PathLike, np.ndarray)) and not (
            isinstance(images, np.ndarray) and images.ndim == 4
        ):
            # One bare image; a 4-D array is a stack (N, H, W, C) and iterates as N images.
            images = [images]
        images = list(images)
        counts = [count_images(p) for p in prompts]
        if sum(counts) != len(images):
            raise ValueError(
                f"the prompts have {sum(counts)} {IMAGE_MARKER} markers (per prompt: {counts}) "
                f"but {len(images)} images were given"
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
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.preprocess_images(images),
        }
