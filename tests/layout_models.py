"""Tiny models of the released BLOOMZ and video layouts, and their reference checkpoints copied for a run."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

from helpers import BLOOMZ, VIDEO_FIXTURE, tiny_config
from owl_jax.config import OwlConfig

FIXTURES = {"bloom": BLOOMZ, "video": VIDEO_FIXTURE}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_bloom_config(**kw) -> OwlConfig:
    """The tiny test model (`tiny_config`) with a 2-layer BLOOM (hidden 24, 2 heads, MLP 4 × 24, tied head) as f_L."""
    cfg = tiny_config(**kw)
    text = dataclasses.replace(
        cfg.text, model_type="bloom", hidden_act="bloom_gelu", intermediate_size=96, tie_word_embeddings=True
    )
    return cfg.replace(text=text).validate()


def tiny_video_config(**kw) -> OwlConfig:
    """The tiny test model (`tiny_config`) in the video layout (temporal modules, temporal queries)."""
    return tiny_config(video=True, **kw).validate()


def checkpoint_with_tokenizer(layout: str, folder: pathlib.Path) -> pathlib.Path:
    """The `layout` ("bloom" or "video") fixture's checkpoint with its tokenizer files beside the weights,
    as a released folder holds them, copied to `folder` (writable)."""
    source = FIXTURES[layout]
    shutil.copytree(source / "checkpoint", folder)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder
