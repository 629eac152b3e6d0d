"""Orbax checkpoints of a training stage: the train state, the data iterator state, the resolved config
and their checksums (`owl_jax.training.digest`).

Saves are asynchronous (training continues while the previous save is written), happen every N steps,
on request (SIGTERM / preemption) and at the end; the last K are kept. Orbax writes each checkpoint under
a temporary name and commits it with a rename, so a run killed mid-save leaves only complete ones and a
temporary folder, never read and removed at the next start (on an object store such as `gs://`, which has no
rename, Orbax writes the checkpoint in place and its commit marker decides instead). Restoring goes onto the
current mesh from an abstract target with shardings. The folder may be local or remote (`owl_jax.paths`).

Resuming (`restore_latest`) takes the newest checkpoint that is intact: committed (Orbax's commit marker
and step metadata with a commit time), restorable, and equal to its checksums. Newer damaged ones are
named in one line each and moved aside into the sibling folder `<checkpoints>.damaged/` (never deleted:
Orbax would not save a step at or below an existing one, so they cannot stay). Checkpoints that exist
but none intact stop the run with `NoIntactCheckpoint` (`owl-train`: exit status 2) rather than start it afresh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
import threading
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from owl_jax.paths import as_path, move_folder
from owl_jax.training import digest as digest_lib

ITEMS = ("state", "data", "config", "digest")
COMMIT_MARKER = "commit_success.txt"  # written by Orbax into a checkpoint just before it is committed
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's record of a step: its items and commit time


class NoIntactCheckpoint(RuntimeError):
    """The stage has checkpoints but none restores intact (`owl-train` reports it in one line, exit status 2)."""


class DamagedCheckpoint(ValueError):
    """One checkpoint is incomplete or corrupt; the message says how."""


@dataclasses.dataclass
class Restored:
    """What `restore_latest` resumes from."""

    step: int
    state: Any
    data: dict
    config: dict
    damaged: list[tuple[int, str]]  # newer checkpoints passed over: (step, reason)


class StageCheckpoints:
    """The checkpoints of one stage in `directory` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
        self.directory = as_path(directory)  # local: absolute; gs://...: as given, handed to Orbax unchanged
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # the temporary folders of saves that never committed
        )
        with _quiet():  # a damaged step's metadata is reported by `restore_latest`
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    @property
    def damaged_directory(self) -> epath.Path:
        """Where damaged checkpoints are moved: a sibling of the checkpoints folder."""
        return self.directory.parent / (self.directory.name + ".damaged")

    def step_path(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def will_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, ..., force=force)` would start a save."""
        if step in self.manager.all_steps():  # e.g. a stop request right after the periodic save of this step
            return False
        return force or self.manager.should_save(step)

    def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`) and not saved yet; returns whether a save started."""
        if not self.will_save(step, force=force):
            return False
        data_state, config = _as_json(data_state), _as_json(config)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            digest=ocp.args.JsonSave(digest_lib.make_digest(state, data_state, config)),
        )
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """`(state, data iterator state, config)` of checkpoint `step`, the state on `abstract_state`'s shardings.

        Raises `DamagedCheckpoint` when the checkpoint is incomplete, unreadable or differs from its checksums.
        """
        reason = self._file_problem(step)
        if reason:
            raise DamagedCheckpoint(reason)
        items = self._read(step, abstract_state)
        reason = self._digest_problem(items)
        if reason:
            raise DamagedCheckpoint(reason)
        return items["state"], items["data"], items["config"]

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest intact checkpoint, restored onto `abstract_state` (or what it returns, if a function:
        called only when there is a checkpoint); None when there is no checkpoint at all.

        Newer damaged checkpoints are reported on stderr (one line each) and moved into `damaged_directory`.
        Raises `NoIntactCheckpoint` when checkpoints exist but none is intact;
        nothing is moved then.

        Multi-host: every process takes the same decisions. The steps come from the shared directory; after
        each check the processes agree (a checkpoint is intact only if it is on every process) before the
        next collective step, so all restore, verify and resume from the same step; process 0 moves the
        damaged ones while the others wait.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        if callable(abstract_state):
            abstract_state = abstract_state()
        damaged: list[tuple[int, str]] = []
        for step in steps:
            reason = _agree(self._file_problem(step))
            items = None
            if reason is None:
                try:
                    items = self._read(step, abstract_state)
                except DamagedCheckpoint as e:
                    reason = str(e)
                reason = _agree(reason)
            if reason is None:
                reason = _agree(self._digest_problem(items))
            if reason is None:
                self._move_aside(damaged, step)
                return Restored(step, items["state"], items["data"], items["config"], damaged)
            damaged.append((step, reason))
        listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
        raise NoIntactCheckpoint(
            f"no intact checkpoint to resume from in {self.directory} ({listed}); to start the stage over, "
            "move that folder away (or put an intact copy of a checkpoint back) and run again"
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # -- checks -----------------------------------------------------------------------------------
    def _file_problem(self, step: int) -> str | None:
        """Why checkpoint `step` is not a committed, complete one by its files, or None."""
        path = self.step_path(step)
        if not path.is_dir():
            return "not a folder"
        if not (path / COMMIT_MARKER).is_file():
            return f"not committed: no {COMMIT_MARKER}"
        meta = _read_json(path / STEP_METADATA)
        if isinstance(meta, str):
            return meta
        if not isinstance(meta, dict) or not meta.get("commit_timestamp_nsecs"):
            return f"{STEP_METADATA} has no commit time"
        items = meta.get("item_handlers")
        if not isinstance(items, dict) or not {"state", "data", "config"} <= set(items):
            return f"{STEP_METADATA} does not list the items state, data and config"
        for item in items:
            if item in ITEMS and not (path / item).is_dir():
                return f"item folder {item}/ missing"
        return None

    def _items(self, step: int) -> list[str]:
        listed = json.loads((self.step_path(step) / STEP_METADATA).read_text())["item_handlers"]
        return [i for i in ITEMS if i in listed]  # checkpoints from before checksums have no "digest"

    def _read(self, step: int, abstract_state: Any) -> dict:
        """Every item of checkpoint `step`, one at a time (the JSON ones first, so a failure names its item)."""
        restore_args = {
            "data": ocp.args.JsonRestore(),
            "config": ocp.args.JsonRestore(),
            "digest": ocp.args.JsonRestore(),
            "state": ocp.args.StandardRestore(abstract_state),
        }
        listed = self._items(step)
        out: dict[str, Any] = {"step": step}
        for item in (i for i in restore_args if i in listed):
            try:
                with _quiet():
                    out[item] = self.manager.restore(step, args=ocp.args.Composite(**{item: restore_args[item]}))[item]
            except Exception as e:  # Orbax / TensorStore / JSON errors of a damaged item
                raise DamagedCheckpoint(f"item {item}/ {_describe(e)}") from e
            if item in ("data", "config") and not isinstance(out[item], dict):
                raise DamagedCheckpoint(f"item {item}/ is not a JSON object")
        return out

    @staticmethod
    def _digest_problem(items: dict) -> str | None:
        held = int(jax.device_get(items["state"].step))
        if held != items["step"]:
            return f"holds the train state of step {held}"
        if "digest" not in items:
            return None  # saved before checkpoints carried checksums
        try:
            return digest_lib.mismatch(items["digest"], items["state"], items["data"], items["config"])
        except (TypeError, ValueError, KeyError, IndexError) as e:  # a digest/ item of an unexpected shape
            return f"item digest/ unreadable: {type(e).__name__}"

    def _move_aside(self, damaged: list[tuple[int, str]], resumed: int) -> None:
        """Move the damaged checkpoints newer than `resumed` out of Orbax's folder; report each in one line."""
        if not damaged:
            return
        moved: dict[int, str] = {}
        error = None
        if jax.process_index() == 0:
            try:
                self.damaged_directory.mkdir(parents=True, exist_ok=True)
                for step, _ in damaged:
                    dest = _free_name(self.damaged_directory / str(step))
                    move_folder(self.step_path(step), dest)  # an object store: copied, then removed
                    moved[step] = dest
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("owl_jax: damaged checkpoints moved aside")
        if _agree(error) is not None:
            raise NoIntactCheckpoint(
                f"checkpoint step {damaged[0][0]} at {self.step_path(damaged[0][0])} is damaged "
                f"({damaged[0][1]}) and could not be moved into {self.damaged_directory} ({error or 'on process 0'}); "
                "move it away and run again"
            )
        if jax.process_index() == 0:
            for step, reason in damaged:
                print(
                    f"checkpoint step {step} at {self.step_path(step)} is damaged ({reason}); moved it to "
                    f"{moved[step]}; resuming from step {resumed}",
                    file=sys.stderr,
                )
        with _quiet():
            self.manager.reload()


def _as_json(value: dict) -> dict:
    """`value` as JSON reads it back (tuples become lists), so its checksum is that of what is restored."""
    return json.loads(json.dumps(value, default=str))


def _read_json(path: epath.Path) -> Any:
    """The JSON in `path`, or a string saying why it cannot be read."""
    name = path.name
    try:
        return json.loads(path.read_bytes().decode())
    except FileNotFoundError:
        return f"no {name}"
    except (OSError, ValueError) as e:
        return f"{name} unreadable ({type(e).__name__})"


def _describe(error: BaseException) -> str:
    """One short line for a restore error: its root cause's first line, without TensorStore's spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    if len(text) > 240:
        text = text[:237] + "..."
    return f"unreadable: {type(error).__name__}" + (f": {text}" if text else "")


def _agree(reason: str | None) -> str | None:
    """`reason`, or a note that another process found a problem: the same verdict on every process."""
    if jax.process_count() == 1:
        return reason
    bad = multihost_utils.process_allgather(np.int32(reason is not None))
    if reason is None and bool(np.max(bad)):
        return "damaged as read by another process"
    return reason


def _free_name(path: epath.Path) -> epath.Path:
    """`path`, or `path.1`, `path.2`, ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.parent / f"{path.name}.{n}"
    return candidate


class _DropStepMetadataComplaints(logging.Filter):
    """Drops Orbax's log lines about unreadable step metadata (`restore_latest` reports those itself)."""

    PREFIXES = ("Metadata file does not exist", "Failed to read Metadata file", "Failed to json parse Metadata file")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES))


@contextlib.contextmanager
def _quiet():
    """Silence what Orbax leaves on stderr about a damaged checkpoint: its complaints about unreadable step
    metadata, and the tracebacks and warnings of a failed restore (TensorStore reads abandoned in Orbax's
    asyncio tasks, reported as they are collected or call back into a closed event loop). The failure itself
    is raised, and reported in one line."""
    hooks = sys.unraisablehook, threading.excepthook, sys.excepthook
    asyncio_log, absl_log = logging.getLogger("asyncio"), logging.getLogger("absl")
    disabled, drop = asyncio_log.disabled, _DropStepMetadataComplaints()
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    sys.excepthook = lambda *exc: None
    asyncio_log.disabled = True
    absl_log.addFilter(drop)
    failed = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
            try:
                yield
            except BaseException:
                failed = True
                gc.collect()  # the abandoned reads report now, while silenced
                raise
    finally:
        sys.unraisablehook, threading.excepthook, sys.excepthook = hooks
        asyncio_log.disabled = disabled
        absl_log.removeFilter(drop)
        if failed:
            _drop_late_closed_loop_errors()


def _drop_late_closed_loop_errors() -> None:
    """From now on, drop the "Event loop is closed" errors that TensorStore reads abandoned by a failed restore
    raise when they complete after Orbax closed their event loop (possibly long after; they have nowhere to go).
    Every other unraisable error still reaches the hook installed before."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_errors", False):
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if unraisable.object is None and isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook
