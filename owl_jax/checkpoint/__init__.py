"""Checkpoints: the released PyTorch layout and owl_jax's converted folder, read and written.

    from owl_jax import checkpoint

    loaded = checkpoint.load_checkpoint("mplug-owl-llama-7b")          # any supported folder → leaves
    model = checkpoint.assemble(*checkpoint.abstract_model(loaded.config), loaded.leaves)
    checkpoint.import_checkpoint("mplug-owl-llama-7b", "converted")     # → converted folder
    checkpoint.export_checkpoint("converted", "hf-out")                 # → released layout
    checkpoint.init_from_towers_checkpoint("clip", "llama", "fresh")    # stage 1's starting point

Parameters travel as flat leaves `{path: array}` (`leaves.py`). The modules, one idea each:

    tensor_files   the tensor-file formats: `.bin` and safetensors, read and written one tensor at a time
    keys/          one key table per tower (released ViT, abstractor, LLaMA or BLOOM; HF CLIP, HF LLaMA or
                   BLOOM) and the transforms between a checkpoint tensor and a Flax leaf
    streaming      streaming import: key inventory, strict key checks, leaves read one at a time
    released       a released-layout folder (+ LoRA adapter) → leaves
    load           any supported folder → leaves; `import` (→ converted folder)
    converted      the converted folder: Orbax params + owl_jax.json + config.json + side files
    export         leaves → the released layout (+ a peft adapter)
    lora           LoRA adapters: locating peft adapters / trainer checkpoints, merging
    towers         a fresh model from HF CLIP + HF LLaMA (or BLOOM) towers (`init`)
    folders        atomic output folders and the side files that travel with the weights
    errors         the error classes
"""

from owl_jax.checkpoint.converted import is_converted, load_converted_leaves, save_converted
from owl_jax.checkpoint.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    UnsafeCheckpointError,
)
from owl_jax.checkpoint.export import export_checkpoint, export_hf, write_peft_adapter
from owl_jax.checkpoint.keys import owl_targets, rotary_buffers
from owl_jax.checkpoint.leaves import (
    Path,
    PendingLeaf,
    abstract_model,
    assemble,
    flat_shardings,
    flatten,
    host_leaves,
    leaf_shapes,
    nest,
)
from owl_jax.checkpoint.load import LoadedCheckpoint, import_checkpoint, load_checkpoint, open_checkpoint
from owl_jax.checkpoint.lora import LoRASource, locate_lora, merge_lora, merge_lora_params
from owl_jax.checkpoint.tensor_files import open_tensor_file, weight_files
from owl_jax.checkpoint.tensor_writer import parse_size, write_hf_tensors
from owl_jax.checkpoint.towers import (
    clip_vision_config,
    config_from_towers,
    default_abstractor,
    init_from_towers,
    init_from_towers_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "LoRASource",
    "LoadedCheckpoint",
    "Path",
    "PendingLeaf",
    "UnsafeCheckpointError",
    "abstract_model",
    "assemble",
    "clip_vision_config",
    "config_from_towers",
    "default_abstractor",
    "export_checkpoint",
    "export_hf",
    "flat_shardings",
    "flatten",
    "host_leaves",
    "import_checkpoint",
    "init_from_towers",
    "init_from_towers_checkpoint",
    "is_converted",
    "leaf_shapes",
    "load_checkpoint",
    "load_converted_leaves",
    "locate_lora",
    "merge_lora",
    "merge_lora_params",
    "nest",
    "open_checkpoint",
    "open_tensor_file",
    "owl_targets",
    "parse_size",
    "rotary_buffers",
    "save_converted",
    "weight_files",
    "write_hf_tensors",
    "write_peft_adapter",
]
