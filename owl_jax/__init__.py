"""owl_jax: mPLUG-Owl (arXiv 2304.14178) in JAX/Flax NNX.

    model, processor = owl_jax.from_pretrained("path/to/mplug-owl-llama-7b", dtype="bfloat16")
    inputs = processor([prompt], images=[image])
    logits = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
"""

from owl_jax.api import from_pretrained
from owl_jax.config import AbstractorConfig, LoRAConfig, OwlConfig, TextConfig, VisionConfig
from owl_jax.modeling import Owl

__all__ = ["AbstractorConfig", "LoRAConfig", "Owl", "OwlConfig", "TextConfig", "VisionConfig", "from_pretrained"]
__version__ = "0.1.0"
