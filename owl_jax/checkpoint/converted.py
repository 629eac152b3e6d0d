"""The converted folder: Flax parameters as an Orbax checkpoint beside the HF config.

    OUT_DIR/
      config.json              the released MplugOwlConfig (kept as given, or written from OwlConfig)
      generation_config.json   tokenizer.model ...   copied from the source when present
      params/                  Orbax checkpoint of {tower: {module: {param: array}}}
      owl_jax.json             format marker, parameter dtype, LoRA config; written last

The folder is written atomically (`folders.atomic_folder`). Both directions hold about one leaf beyond
what they must: saving writes the leaves a few at a time (a `PendingLeaf` is read just before it is written), where
Orbax alone would take every leaf at once and copy them all while writing; loading restores the leaves
largest first and a few at a time, so the copies made while a leaf is read are
largest while little else is held.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from owl_jax.checkpoint.errors import CheckpointError
from owl_jax.checkpoint.folders import atomic_folder, copy_side_files, open_output
from owl_jax.checkpoint.leaves import Path, PendingLeaf, flatten, largest_first, materialize, nest
from owl_jax.config import ConfigError, LoRAConfig
from owl_jax.quant.spec import QUANT_LEAVES, QuantSpec

META_FILE = "owl_jax.json"
PARAMS_DIR = "params"
FORMAT = "owl_jax.params"
FORMAT_VERSION = 1
# Leaves up to this size in all are written / restored together (each step has a fixed cost).
_WRITE_GROUP_BYTES = _RESTORE_GROUP_BYTES = 256 * 2**20
# The failed writes of the save in progress (`_leaves_in_turn`): the first is raised once all have finished.
_WRITE_FAILURES: contextvars.ContextVar[list[BaseException]] = contextvars.ContextVar("owl_jax_write_failures")


def is_converted(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, META_FILE))


def read_meta(folder: str) -> dict[str, Any]:
    """The folder's `owl_jax.json`, checked for format and version."""
    path = os.path.join(folder, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read {path}: {reason}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not an owl_jax parameter folder (format={found!r})")
    if not isinstance(meta.get("version", 0), int):
        raise CheckpointError(f"{path}: version must be an integer, got {meta['version']!r}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta['version']}; this owl_jax reads up to {FORMAT_VERSION}. Upgrade owl_jax."
        )
    return meta


def lora_config_of(meta: dict[str, Any], where: str = META_FILE) -> LoRAConfig | None:
    """The LoRA config stored in `meta` (None without adapters); a malformed one raises `CheckpointError`
    naming `where`."""
    lora = meta.get("lora")
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise CheckpointError(f"{where}: lora must be an object (a peft adapter config) or null, got {lora!r:.60}")
    try:
        return LoRAConfig.from_peft_dict(lora)
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{where}: lora is not a valid adapter config: {e}") from None


def quant_spec_of(meta: dict[str, Any], where: str = META_FILE) -> QuantSpec | None:
    """The quantization stored in `meta` (None for float weights); a malformed one raises `CheckpointError`
    naming `where`."""
    quant = meta.get("quantization")
    if quant is None:
        return None
    try:
        return QuantSpec.from_dict(quant, where=f"{where}: quantization")
    except (ValueError, TypeError) as e:
        raise CheckpointError(str(e)) from None


def save_converted(
    out_dir: str,
    leaves: dict[Path, Any],
    *,
    hf_config: dict[str, Any],
    lora: LoRAConfig | None,
    side_files_from: str | None = None,
    source: str = "",
    rotary_buffers: bool = True,
    overwrite: bool = False,
    quant: QuantSpec | None = None,
) -> str:
    """Write a converted folder atomically; returns its path.

    Args:
      leaves: `{path: array}` host (numpy) arrays, `PendingLeaf`s (read one at a time while writing) or
        global `jax.Array`s.
      hf_config: the `config.json` dict to keep (the source's, unchanged).
      lora: the adapters' config when `leaves` holds `lora_a`/`lora_b` leaves.
      rotary_buffers: whether an export should write `rotary_emb.inv_freq` buffers (the released layout).
      quant: the quantization of the `qvalue`/`qscale` leaves (`owl_jax.quant`), when `leaves` hold them.
    """
    skip = ("lora_a", "lora_b", *QUANT_LEAVES)
    dtypes = sorted({str(np.dtype(v.dtype)) for p, v in leaves.items() if p[-1] not in skip})
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        with open_output(os.path.join(tmp, "config.json")) as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        copy_side_files(side_files_from, tmp)
        _save_pytree(os.path.join(tmp, PARAMS_DIR), leaves)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "param_dtypes": dtypes,
            "lora": None if lora is None else lora.to_peft_dict(),
            "rotary_buffers": rotary_buffers,
            "source": source,
            "quantization": None if quant is None else quant.to_dict(),
        }
        with open_output(os.path.join(tmp, META_FILE)) as f:
            json.dump(meta, f, indent=2)
    return os.path.abspath(out_dir)


@functools.cache
def _leaves_in_turn() -> Any:
    """An Orbax handler for host leaves that writes them a few at a time, or None if this Orbax lacks the
    hooks it needs.

    Orbax's own `NumpyHandler` starts writing every leaf at once, and the writes copy what they write;
    this one materializes up to `_WRITE_GROUP_BYTES` of leaves (a larger leaf: alone) and writes them
    while it reads the next group, never more. Its leaves are stored exactly as `NumpyHandler` stores
    them (same type name, same tensorstore layout).
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import future as ocp_future

    base = ocp.type_handlers.NumpyHandler
    if (
        not hasattr(base, "_background_serialize")
        or not hasattr(base, "_open_and_write")
        or not hasattr(ocp_future, "CommitFutureAwaitingContractedSignals")
    ):
        return None

    class LeavesInTurn(base):
        async def _open_and_write(self, value, tspec, ts_context):
            # Orbax gathers a group's writes and gives up at the first failure while the others are still
            # in flight; they then report into a closed event loop (a traceback each). Here every write
            # finishes, a failure is recorded, and once one has failed no further write starts.
            failures = _WRITE_FAILURES.get(None)
            if failures is None:
                return await super()._open_and_write(value, tspec, ts_context)
            if failures:
                return None
            try:
                await super()._open_and_write(value, tspec, ts_context)
            except Exception as e:
                failures.append(e)
            return None

        async def serialize(self, values, infos, args=None):
            args = list(args or [ocp.SaveArgs()] * len(values))
            groups = _groups([int(v.nbytes) for v in values], _WRITE_GROUP_BYTES)

            async def write_all() -> None:
                # The next group is read (in a worker thread) while the previous one is being written.
                failures: list[BaseException] = []
                _WRITE_FAILURES.set(failures)  # seen by the write tasks started below (they copy this context)
                loop = asyncio.get_running_loop()
                writing = None
                try:
                    for group in groups:
                        arrays = await loop.run_in_executor(None, lambda g=group: [materialize(values[i]) for i in g])
                        if writing is not None:
                            await writing
                            if failures:
                                break
                        writing = asyncio.ensure_future(
                            self._background_serialize(arrays, [infos[i] for i in group], [args[i] for i in group])
                        )
                        del arrays
                    if writing is not None:
                        await writing
                except BaseException:
                    # A leaf that cannot be read: let the writes in flight finish before the loop closes.
                    if writing is not None and not writing.done():
                        await asyncio.gather(writing, return_exceptions=True)
                    raise
                if failures:
                    raise failures[0]

            return [ocp_future.CommitFutureAwaitingContractedSignals(write_all(), name="owl_jax_leaves")]

    return LeavesInTurn(deepcopy_host_arrays=False)


def _groups(sizes: list[int], limit: int) -> list[list[int]]:
    """Indices of `sizes` in order, in consecutive groups of at most `limit` bytes (a larger one: alone)."""
    groups: list[list[int]] = []
    total = limit
    for i, n in enumerate(sizes):
        if total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


def _save_pytree(path: str, leaves: dict[Path, Any]) -> None:
    """Orbax save, uncompressed (compression makes saving ~3x slower for ~20% smaller bf16 weights), host
    leaves a few at a time and without Orbax's defensive copies (nothing modifies them while saving)."""
    import orbax.checkpoint as ocp

    options: dict[str, Any] = {"use_compression": False}
    host = _leaves_in_turn()
    if host is None:  # an older Orbax: every pending leaf is read first, then written as Orbax writes
        leaves = {p: materialize(v) for p, v in leaves.items()}
    try:
        if host is None:
            host = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
        options["type_handler_registry"] = ocp.type_handlers.create_type_handler_registry(
            (PendingLeaf, host), (np.ndarray, host), (jax.Array, ocp.type_handlers.ArrayHandler())
        )
    except (TypeError, AttributeError):  # an Orbax without these options: its defaults (copying)
        leaves = {p: materialize(v) for p, v in leaves.items()}
    with _orbax_errors_raised_not_logged():
        ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options)).save(path, args=ocp.args.PyTreeSave(nest(leaves)))


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or "orbax" not in record.pathname


@contextlib.contextmanager
def _orbax_errors_raised_not_logged() -> Iterator[None]:
    """While saving, Orbax's background threads log each failure with its traceback (ERROR, logger `absl`)
    before the same error is raised here; the caller reports the raised one, so the logged copies are dropped."""
    logger = logging.getLogger("absl")
    drop = _DropOrbaxErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_converted_leaves(
    folder: str,
    shapes: dict[Path, tuple[tuple[int, ...], Any]],
    *,
    dtype: str | None = None,
    shardings: dict[Path, jax.sharding.Sharding] | None = None,
    on_host: bool = False,
) -> dict[Path, Any]:
    """Restore the leaves of a converted folder, checked against the model's `shapes`.

    Args:
      shapes: `{path: (shape, dtype)}` of the model to fill (from `leaves.leaf_shapes`).
      dtype: cast to this dtype on restore; None keeps the stored dtypes. Quantized leaves (`qvalue`,
        `qscale`) always keep theirs.
      shardings: place each leaf on these shardings (default: the first device).
      on_host: restore numpy arrays instead of device arrays.

    Returns:
      `{path: array}`, numpy arrays with `on_host`, else `jax.Array`s.
    """
    import orbax.checkpoint as ocp

    params_dir = os.path.join(os.path.abspath(folder), PARAMS_DIR)
    stored = _stored_metadata(folder)
    missing = sorted("/".join(p) for p in shapes if p not in stored)
    unexpected = sorted("/".join(p) for p in stored if p not in shapes)
    misshaped = sorted(
        f"{'/'.join(p)}: stored {tuple(stored[p].shape)} vs model {shapes[p][0]}"
        for p in shapes
        if p in stored and tuple(stored[p].shape) != tuple(shapes[p][0])
    )
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{folder} does not match the model config: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, shape mismatches {misshaped[:8]}"
        )

    cast = lambda p, m: np.dtype(dtype) if dtype and p[-1] not in QUANT_LEAVES else m.dtype
    target = {p: jax.ShapeDtypeStruct(tuple(m.shape), cast(p, m)) for p, m in stored.items()}
    # Without shardings, each leaf is restored on the host and then placed, which holds less at once than
    # Orbax placing it; with shardings, Orbax reads only this process's shards.
    host_first = on_host or not shardings
    if host_first:
        args = {p: ocp.RestoreArgs(restore_type=np.ndarray, dtype=t.dtype) for p, t in target.items()}
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        places = {p: shardings.get(p, device) for p in target}
        target = {p: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=places[p]) for p, t in target.items()}
        args = {
            p: ocp.ArrayRestoreArgs(sharding=places[p], global_shape=t.shape, dtype=t.dtype) for p, t in target.items()
        }
    first = jax.devices()[0]
    place = (lambda leaf: leaf) if on_host else (lambda leaf: jax.block_until_ready(jax.device_put(leaf, first)))
    checkpointer = ocp.PyTreeCheckpointer()
    fields = {f.name for f in dataclasses.fields(ocp.args.PyTreeRestore)}
    partial = "partial_restore" in fields  # an older Orbax restores everything at once
    out: dict[Path, Any] = {}
    for group in _restore_groups(target) if partial else [list(target)]:
        restore = ocp.args.PyTreeRestore(
            item=nest({p: target[p] for p in group}),
            restore_args=nest({p: args[p] for p in group}),
            **({"partial_restore": True} if partial else {}),
        )
        restored = flatten(checkpointer.restore(params_dir, args=restore))
        for path in group:
            out[path] = place(restored.pop(path)) if host_first else restored.pop(path)
    return out


def _stored_metadata(folder: str) -> dict[Path, Any]:
    """`{path: metadata}` (with `shape` and `dtype`) of the leaves in a converted folder; no tensor is read."""
    import orbax.checkpoint as ocp

    params_dir = os.path.join(os.path.abspath(folder), PARAMS_DIR)
    try:
        return flatten(ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree)
    except Exception as e:  # orbax raises several error types for missing/corrupt metadata
        raise CheckpointError(f"cannot read the parameter checkpoint in {params_dir}: {e}") from None


def stored_shapes(folder: str) -> dict[Path, tuple[int, ...]]:
    """`{path: shape}` of the leaves a converted folder holds (from its metadata; no tensor is read)."""
    return {p: tuple(m.shape) for p, m in _stored_metadata(folder).items()}


def _restore_groups(target: dict[Path, jax.ShapeDtypeStruct]) -> list[list[Path]]:
    """The paths largest first, in groups of up to `_RESTORE_GROUP_BYTES` (a larger leaf: alone)."""
    paths = largest_first(target)
    sizes = [int(np.prod(target[p].shape, dtype=np.int64)) * np.dtype(target[p].dtype).itemsize for p in paths]
    return [[paths[i] for i in group] for group in _groups(sizes, _RESTORE_GROUP_BYTES)]
