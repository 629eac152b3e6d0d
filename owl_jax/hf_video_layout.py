"""The released video layout's `config.json` (`mplug-owl-llama-7b-video`): how it differs from the image one.

The video package's config class copies the language model's attributes to the top level of `config.json`
(`hidden_size`, `vocab_size`, ...: they describe LLaMA, not the ViT or the abstractor). That copy is the
only mark of the layout in the file, so it is how `owl_config_from_hf` tells the two apart: `hidden_size`
and `vocab_size` at the top level. (The image package's BLOOMZ config also has top-level
`num_hidden_layers`/`num_attention_heads`, holding the strings "n_layer"/"n_head": they mark nothing.)

The video package also builds the abstractor's SwiGLU `256·ceil(floor(2I/3)/256)` wide, unless the config's
`intermediate_size` I is 2816 (4096 → 2816, 176 → 256; 256, 512 and 2816 map to themselves).
`OwlConfig.abstractor.intermediate_size` is always the width the weights have: it is read through that
rule here, and loading a checkpoint takes it from the weights when they say otherwise.
"""

from __future__ import annotations

import math
from typing import Any

from owl_jax.config import ConfigError

# The LM attributes whose presence at the top level marks the video layout.
MARKERS = ("hidden_size", "vocab_size")
# The top-level LM sizes checked against text_config in the video layout.
SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
# What the released video config writes at the top level, copied from text_config.
COPIED = SIZES + ("hidden_act", "max_position_embeddings", "rms_norm_eps", "use_cache")
_KEPT_WIDTH = 2816  # the one width the video package leaves as it is


def is_video_layout(d: dict[str, Any], where: str) -> bool:
    """Whether a released `config.json` dict is in the video layout; its top-level LM attributes must then
    agree with `text_config`, or a one-line `ConfigError` names the first that does not."""
    if not all(k in d for k in MARKERS):
        return False
    text = d.get("text_config")
    for key in (k for k in SIZES if k in d):
        if isinstance(text, dict) and key in text and text[key] != d[key]:
            raise ConfigError(
                f"{where}: top-level {key} {d[key]!r} differs from text_config.{key} {text[key]!r} (the video "
                f"layout copies the language model's attributes to the top level)"
            )
    return True


def video_swiglu_width(intermediate_size: int) -> int:
    """The abstractor SwiGLU width the video package builds for the config's `intermediate_size`."""
    if intermediate_size == _KEPT_WIDTH:
        return intermediate_size
    return 256 * math.ceil(int(2 * intermediate_size / 3) / 256)


def released_intermediate_size(width: int) -> int:
    """An `intermediate_size` for which the video package builds a SwiGLU `width` wide.

    Raises:
      ConfigError: no such value (the video package only builds multiples of 256, and 2816).
    """
    for candidate in (width, 3 * width // 2):
        if candidate > 0 and video_swiglu_width(candidate) == width:
            return candidate
    raise ConfigError(
        f"the released video code cannot build an abstractor SwiGLU of width {width} (it builds multiples of 256)"
    )


def to_video_layout(hf: dict[str, Any], abstractor_width: int) -> dict[str, Any]:
    """An image-layout `config.json` dict turned into the video layout (a new dict): the LM attributes
    copied to the top level and the abstractor's `intermediate_size` set for the video package's rule."""
    out = dict(hf)
    text = hf["text_config"]
    out.update({k: text[k] for k in COPIED if k in text})
    out["visual_abstractor_config"] = dict(
        hf["visual_abstractor_config"], intermediate_size=released_intermediate_size(abstractor_width)
    )
    return out
