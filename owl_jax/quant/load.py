"""Quantizing checkpoint folders as they are read: `load_checkpoint` and `import_checkpoint` with `quantize=`.

A folder is float (the released layout, or a converted folder) or already quantized (a converted folder
whose `owl_jax.json` records `"quantization"`, written by `import_checkpoint(quantize=...)` or by a QLoRA training run).

- A quantized folder loads as it is stored: integers and scales go straight onto their devices (asking
  for another quantization than the stored one is an error: the float weights are gone).
- A float folder is read one leaf at a time (the released layout; a converted folder is restored whole
  on the host first) and each selected kernel is quantized and placed before the next is read, so the
  devices never hold the float kernels (`owl_jax.quant.leaves`).
- `import_checkpoint(quantize=...)` writes a quantized converted folder: each kernel is read from the source, quantized
  and written while the writer reads the next, about one float kernel held at a time.

Adapters (`lora=`) stay float over a quantized base (QLoRA). Merging adapters (`merge_lora`) happens in
float before quantizing; adapters stored in an already quantized folder cannot be merged.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.checkpoint import converted
from owl_jax.checkpoint.errors import CheckpointError
from owl_jax.checkpoint.leaves import Path, PendingLeaf, abstract_model, flat_shardings, materialize
from owl_jax.checkpoint.streaming import keep_on_host, to_devices
from owl_jax.config import OwlConfig
from owl_jax.quant.arrays import quantize_host, stored_dtypes, stored_shapes
from owl_jax.quant.leaves import quantize_leaves, quantized_kernels
from owl_jax.quant.spec import QSCALE, QUANT_LEAVES, QVALUE, QuantSpec, parse_quantize


def stored_quantization(path: str | os.PathLike) -> QuantSpec | None:
    """The quantization a checkpoint folder stores (None: float weights, or not a converted folder)."""
    path = os.fspath(path)
    if not converted.is_converted(path):
        return None
    return converted.quant_spec_of(converted.read_meta(path), os.path.join(path, converted.META_FILE))


def resolve_quantization(
    path: str | os.PathLike,
    requested: Any,
    *,
    merge_lora: bool = False,
    lora: str | None = None,
    stored_when_none: bool = True,
) -> QuantSpec | None:
    """The quantization to load `path` with, from what was asked for (`parse_quantize`'s inputs).

    A float folder takes the requested spec. A quantized folder takes its stored spec when the request
    is None (if `stored_when_none`), names its mode ("int4" for a folder stored with group size 32), or
    equals it; any other request raises `CheckpointError` (the float weights are gone), and so does a
    request that would merge adapters into its quantized kernels.
    """
    path = os.path.abspath(os.fspath(path))
    stored = stored_quantization(path)
    if stored is None:
        return parse_quantize(requested)
    if requested is None or requested == "":
        if not stored_when_none:
            raise CheckpointError(
                f"{path} holds weights quantized as {stored.to_dict()}; ask for that quantization "
                f"(quantize={stored.mode!r}) to load them"
            )
    elif requested != stored.mode and parse_quantize(requested) != stored:
        raise CheckpointError(
            f"{path} holds weights quantized as {stored.to_dict()}; they cannot be quantized again as "
            f"{parse_quantize(requested).to_dict()} (load the float checkpoint instead)"
        )
    if merge_lora and (lora is not None or _stores_lora(path)):
        raise CheckpointError(
            f"{path} holds quantized weights: adapters cannot be merged into them (merge into the float "
            f"checkpoint, then quantize)"
        )
    return stored


def quantize_loaded(loaded: Any, spec: QuantSpec, mesh: jax.sharding.Mesh | None, on_host: bool) -> Any:
    """`loaded` (a `LoadedCheckpoint` of float host leaves) with the kernels `spec` selects quantized.

    Each float leaf is freed once its quantized halves are placed (on `mesh`'s shards, the first device,
    or kept on the host with `on_host`); the returned checkpoint's config has `quant=spec`.
    """
    cfg = loaded.config.replace(quant=spec)
    if on_host:
        finalize = keep_on_host
    else:
        finalize = to_devices(flat_shardings(abstract_model(cfg)[1], mesh) if mesh is not None else None)
    leaves, loaded.leaves = loaded.leaves, {}  # consumed below: each float leaf is freed once placed
    return dataclasses.replace(loaded, config=cfg, leaves=quantize_leaves(leaves, cfg, finalize=finalize))


def _stores_lora(path: str) -> bool:
    return converted.is_converted(path) and converted.read_meta(path).get("lora") is not None


def pending_quantized(module: Path, leaf: Any, spec: QuantSpec) -> dict[Path, PendingLeaf]:
    """`{module/qvalue, module/qscale}` as pending leaves of the float kernel `leaf` (an array or a
    `PendingLeaf`): reading either quantizes the kernel once and keeps the other half until it is read."""
    q_shape, s_shape = stored_shapes(tuple(leaf.shape), spec)
    q_dtype, s_dtype = stored_dtypes(spec)
    held: dict[str, Any] = {}

    def produce(which: str):
        if which not in held:
            held[QVALUE], held[QSCALE] = quantize_host(materialize(leaf), spec)
        return held.pop(which)

    return {
        module + (QVALUE,): PendingLeaf(q_shape, q_dtype, lambda: produce(QVALUE)),
        module + (QSCALE,): PendingLeaf(s_shape, s_dtype, lambda: produce(QSCALE)),
    }


def quantized_for_import(leaves: dict[Path, Any], cfg: OwlConfig, dtype: str | None) -> dict[Path, Any]:
    """Float leaves of a source → the leaves of its quantized converted folder, still pending.

    Each kernel `cfg.quant` selects becomes `qvalue`/`qscale` leaves, quantized from the source's values
    when written; `dtype` casts the leaves that stay float.
    """
    leaves = _quantized_pending(leaves, cfg, cfg.quant)
    if dtype is None:
        return leaves
    return {p: v if p[-1] in QUANT_LEAVES else _cast(v, dtype) for p, v in leaves.items()}


def _quantized_pending(leaves: dict[Path, Any], cfg: OwlConfig, spec: QuantSpec) -> dict[Path, Any]:
    targets = quantized_kernels(cfg)
    out: dict[Path, Any] = {}
    for path, leaf in leaves.items():
        if path[-1] == "kernel" and path[:-1] in targets:
            out.update(pending_quantized(path[:-1], leaf, spec))
        else:
            out[path] = leaf
    return out


def _cast(leaf: Any, dtype: str) -> Any:
    """`leaf` (an array or a `PendingLeaf`, cast when read) in `dtype`."""
    dtype = np.dtype(jnp.dtype(dtype))
    if isinstance(leaf, PendingLeaf):
        if leaf.dtype == dtype:
            return leaf
        return PendingLeaf(leaf.shape, dtype, lambda: materialize(leaf).astype(dtype))
    return np.asarray(leaf).astype(dtype, copy=False)
