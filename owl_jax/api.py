"""`owl_jax.from_pretrained`: a checkpoint folder → a ready `Owl` model and its processor."""

from __future__ import annotations

import os
from typing import Any

import jax

from owl_jax.checkpoint import abstract_model, assemble, load_checkpoint
from owl_jax.config import Numerics
from owl_jax.modeling import Owl
from owl_jax.quant.spec import QuantSpec


def from_pretrained(
    path: str | os.PathLike,
    dtype: str = "float32",
    lora: str | os.PathLike | None = None,
    *,
    param_dtype: str | None = None,
    merge_lora: bool = False,
    lora_alpha: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    scan_layers: bool = True,
    remat_policy: str = "none",
    attention_impl: str | None = None,
    numerics: Numerics | None = None,
    show_progress: bool = True,
    quantize: str | QuantSpec | None = None,
) -> tuple[Owl, Any]:
    """Load mPLUG-Owl for inference or further training.

    Args:
      path: an HF-layout folder of the released model (`config.json` with `pytorch_model.bin`, `.bin` shards
        + `pytorch_model.bin.index.json`, `model.safetensors`, or safetensors shards + index), or a folder
        written by `convert_weights.py import`.
      dtype: compute dtype, "float32" or "bfloat16" ("float16" also works).
      lora: a peft adapter folder, or a training checkpoint holding LoRA keys (`base_model.model.` prefix,
        `.default` adapter keys). Kept as LoRA parameters unless `merge_lora`.
      param_dtype: dtype of the parameters (default: `dtype`).
      lora_alpha: adapter alpha when the source has no `adapter_config.json`.
      mesh: a `(data, fsdp, tensor)` mesh (`owl_jax.sharding.make_mesh`); each tensor goes straight onto
        its shards. Default: the first device.
      scan_layers, remat_policy: how to run the layers (`OwlConfig`'s fields of those names).
      numerics: the routes of the model's arithmetic (`owl_jax.config.Numerics`; default: all "auto").
      attention_impl: shorthand for `numerics.attention`.
      quantize: "int8" or "int4" (or a `owl_jax.quant.QuantSpec`): hold the language model's linear
        weights as integers and scales (docs/quantization.md); each kernel is quantized as it is read. A
        folder written quantized (`convert_weights.py import --quantize`) loads quantized without it (or
        with its mode named).

    Returns:
      `(model, processor)`; `processor` is None when the folder holds no `tokenizer.model` or `tokenizer.json`.
    """
    path = os.fspath(path)
    param_dtype = param_dtype or dtype
    numerics = numerics or Numerics()
    if attention_impl is not None:
        numerics = numerics.replace(attention=attention_impl)
    runtime = dict(
        dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat_policy=remat_policy, numerics=numerics
    )
    loaded = load_checkpoint(
        path,
        quantize=quantize,
        weights_dtype=param_dtype,
        lora=None if lora is None else os.fspath(lora),
        merge_lora=merge_lora,
        lora_alpha=lora_alpha,
        mesh=mesh,
        show_progress=show_progress,
        runtime=runtime,
    )
    graphdef, abstract = abstract_model(loaded.config)
    model = assemble(graphdef, abstract, loaded.leaves)
    return model, _processor_for(path, loaded.config)


def _processor_for(path: str, config: Any) -> Any:
    from owl_jax.data.processor import OwlProcessor
    from owl_jax.data.tokenizer import find_tokenizer_file

    if find_tokenizer_file(path) is None:
        return None
    return OwlProcessor.from_pretrained(path, config=config)
