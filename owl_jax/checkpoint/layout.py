"""The checkpoint's layout (image or video) against the config's, before any tensor is read.

- A video checkpoint read into a model built with the image layout would leave its temporal modules and
  temporal queries unused: `check_layout` names them in one line instead.
- The video package widens the abstractor's SwiGLU by a rule of its own (`owl_jax.hf_video_layout`):
  `with_abstractor_width` takes the width the weights have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from owl_jax.checkpoint.errors import CheckpointMismatchError
from owl_jax.checkpoint.keys import is_video_key
from owl_jax.config import OwlConfig
from owl_jax.modeling.abstractor import HF_MODULES

# The first abstractor layer's SwiGLU gate: released `(width, D)`, Flax stacked kernel `(L, D, width)`.
W1_KEY = HF_MODULES["layers/w1"].format(i=0) + ".weight"
W1_PATH = ("abstractor", "layers", "w1", "kernel")
_SHOWN = 6


def check_layout(cfg: OwlConfig, keys: Iterable[str], source: str) -> None:
    """Raise a one-line `CheckpointMismatchError` when `keys` (a checkpoint's) hold the video layout's
    modules but `cfg` builds the image layout."""
    if cfg.video:
        return
    extra = sorted(k for k in keys if is_video_key(k))
    if extra:
        shown = ", ".join(extra[:_SHOWN]) + (f", ... ({len(extra)} in all)" if len(extra) > _SHOWN else "")
        raise CheckpointMismatchError(
            f"{source} has the video layout but the model is built with the image layout; unexpected keys: "
            f"{shown}. Read it with the config.json it was saved with (its top-level LM attributes mark the "
            f"video layout)."
        )


def with_abstractor_width(cfg: OwlConfig, width: int | None) -> OwlConfig:
    """`cfg` with the abstractor SwiGLU `width` of the weights (None: unknown, `cfg` unchanged); only the video
    layout's width is taken from the weights, the image layout's must match its config."""
    if not cfg.video or width is None or width == cfg.abstractor.intermediate_size:
        return cfg
    return cfg.replace(abstractor=dataclasses.replace(cfg.abstractor, intermediate_size=int(width)))
