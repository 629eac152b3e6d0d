"""owl_jax: mPLUG-Owl (arXiv 2304.14178) in JAX/Flax NNX.

    model, processor = owl_jax.from_pretrained("path/to/mplug-owl-llama-7b", dtype="bfloat16")
    inputs = processor([prompt], images=[image])
    logits = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])

The names below load on first use, so importing a light submodule (`owl_jax.cli.host_memory`, which
`owl-train --huge_pages` calls before JAX loads) does not import JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from owl_jax.api import from_pretrained as from_pretrained
    from owl_jax.config import AbstractorConfig as AbstractorConfig
    from owl_jax.config import LoRAConfig as LoRAConfig
    from owl_jax.config import OwlConfig as OwlConfig
    from owl_jax.config import TextConfig as TextConfig
    from owl_jax.config import VisionConfig as VisionConfig
    from owl_jax.modeling import Owl as Owl

_HOME = {
    "from_pretrained": "owl_jax.api",
    "Owl": "owl_jax.modeling",
    **{
        name: "owl_jax.config" for name in ("AbstractorConfig", "LoRAConfig", "OwlConfig", "TextConfig", "VisionConfig")
    },
}
__all__ = sorted(_HOME)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'owl_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
