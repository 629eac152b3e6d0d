"""The converted-checkpoint folder: Flax parameters as an Orbax checkpoint beside the HF config.

    OUT_DIR/
      config.json              the released MplugOwlConfig (kept as given, or written from OwlConfig)
      generation_config.json   tokenizer.model ...   copied from the source when present
      params/                  Orbax checkpoint of {tower: {module: {param: array}}}
      owl_jax.json             format marker, parameter dtype, LoRA config; written last

A folder is written under a temporary name and renamed into place only once complete, so an
interrupted conversion never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Any, Iterator

import jax
import numpy as np

from owl_jax.checkpoint.layout import Path
from owl_jax.checkpoint.tensor_files import CheckpointError
from owl_jax.config import LoRAConfig

META_FILE = "owl_jax.json"
PARAMS_DIR = "params"
FORMAT = "owl_jax.params"
FORMAT_VERSION = 1
# Files that travel with the weights when present in the source folder.
SIDE_FILES = ("generation_config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.json", "preprocessor_config.json")


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, META_FILE))


def read_meta(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an owl_jax parameter folder (format={meta.get('format')!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {meta['version']}; this owl_jax reads up to "
                              f"{FORMAT_VERSION}. Upgrade owl_jax.")
    return meta


def lora_config_of(meta: dict[str, Any]) -> LoRAConfig | None:
    return None if meta.get("lora") is None else LoRAConfig.from_peft_dict(meta["lora"])


def nest(leaves: dict[Path, Any]) -> dict[str, Any]:
    """`{("a", "b"): x}` → `{"a": {"b": x}}`."""
    tree: dict[str, Any] = {}
    for path, value in leaves.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def flatten(tree: dict[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


@contextlib.contextmanager
def atomic_folder(out_dir: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder that becomes `out_dir` only if the block finishes without error."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another folder or pass "
                              f"overwrite=True (--overwrite)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out_dir):
        old = os.path.join(parent, f".{os.path.basename(out_dir)}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_side_files(src_dir: str | None, dst_dir: str) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if src_dir and os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def save_converted(out_dir: str, leaves: dict[Path, Any], *, hf_config: dict[str, Any], lora: LoRAConfig | None,
                   side_files_from: str | None = None, source: str = "", rotary_buffers: bool = True,
                   overwrite: bool = False) -> str:
    """Write a converted folder atomically; returns its path.

    Args:
      leaves: `{path: array}` host (numpy) or global `jax.Array` leaves.
      hf_config: the `config.json` dict to keep (the source's, unchanged).
      lora: the adapters' config when `leaves` holds `lora_a`/`lora_b` leaves.
      rotary_buffers: whether an export should write `rotary_emb.inv_freq` buffers (the released layout).
    """
    import orbax.checkpoint as ocp

    dtypes = sorted({str(np.dtype(v.dtype)) for p, v in leaves.items() if p[-1] not in ("lora_a", "lora_b")})
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        copy_side_files(side_files_from, tmp)
        _save_pytree(os.path.join(tmp, PARAMS_DIR), nest(leaves))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "param_dtypes": dtypes,
                "lora": None if lora is None else lora.to_peft_dict(), "rotary_buffers": rotary_buffers,
                "source": source}
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    return os.path.abspath(out_dir)


def _save_pytree(path: str, tree: dict[str, Any]) -> None:
    """Orbax save without the two costs of its defaults on large host trees.

    Compression makes saving ~3x slower for ~20% smaller bf16 weights, and numpy leaves are deep-copied
    before writing (twice the model in memory); our leaves are not modified while the save runs.
    """
    import orbax.checkpoint as ocp

    options: dict[str, Any] = {"use_compression": False}
    try:
        options["type_handler_registry"] = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()))
    except (TypeError, AttributeError):  # an Orbax without the option: fall back to its default (copying)
        pass
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options)).save(path, args=ocp.args.PyTreeSave(tree))


def load_converted_leaves(folder: str, shapes: dict[Path, tuple[tuple[int, ...], Any]], *, dtype: str | None = None,
                          shardings: dict[Path, jax.sharding.Sharding] | None = None,
                          on_host: bool = False) -> dict[Path, Any]:
    """Restore the leaves of a converted folder, checked against the model's `shapes`.

    Args:
      shapes: `{path: (shape, dtype)}` of the model to fill (from `layout.leaf_shapes`).
      dtype: cast to this dtype on restore; None keeps the stored dtypes.
      shardings: place each leaf on these shardings (default: the first device).
      on_host: restore numpy arrays instead of device arrays.
    """
    import orbax.checkpoint as ocp

    params_dir = os.path.join(os.path.abspath(folder), PARAMS_DIR)
    checkpointer = ocp.StandardCheckpointer()
    try:
        stored = flatten(checkpointer.metadata(params_dir).item_metadata.tree)
    except Exception as e:  # orbax raises several error types for missing/corrupt metadata
        raise CheckpointError(f"cannot read the parameter checkpoint in {params_dir}: {e}") from None
    missing = sorted("/".join(p) for p in shapes if p not in stored)
    unexpected = sorted("/".join(p) for p in stored if p not in shapes)
    misshaped = sorted(f"{'/'.join(p)}: stored {tuple(stored[p].shape)} vs model {shapes[p][0]}"
                       for p in shapes if p in stored and tuple(stored[p].shape) != tuple(shapes[p][0]))
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{folder} does not match the model config: missing {missing[:8]}, unexpected "
                              f"{unexpected[:8]}, shape mismatches {misshaped[:8]}")
    if on_host:
        args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype and np.dtype(dtype)) for p in stored}
        restored = ocp.PyTreeCheckpointer().restore(params_dir, restore_args=nest(args))
        return flatten(restored)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(dtype) if dtype else m.dtype,
                                      sharding=(shardings or {}).get(p, device)) for p, m in stored.items()}
    return flatten(checkpointer.restore(params_dir, nest(target)))
