"""Output folders: written under a temporary name and renamed into place only once complete, with the
side files (tokenizer, generation config, ...) that travel with the weights.

An interrupted or failed conversion therefore never leaves a folder that looks finished. The temporary
folder is `.OUT.partial-PID-HOST-RANDOM` beside `OUT` (and, while `--overwrite` swaps folders, the previous
output is briefly `.OUT.old-PID-HOST-RANDOM`): a run killed outright (kill -9, power loss) leaves them
behind, and the next run into the same `OUT` on the same host removes those whose process is gone (an old
output whose replacement never arrived is put back instead), saying so in one line. Folders of a process
that still runs, or of another host, are left alone.

Failures to write (disk full, file too large, read-only filesystem, no permission), including those of
Orbax's and tensorstore's background writers, are raised as one `CheckpointWriteError` naming the output and
the OS's reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from typing import Any

from owl_jax.checkpoint.errors import CheckpointError, CheckpointWriteError

log = logging.getLogger(__name__)

# Files that travel with the weights when present in the source folder.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "preprocessor_config.json",
)

PARTIAL = "partial"
OLD = "old"
# What follows `.OUT.partial-` / `.OUT.old-`: the writing process's pid, its host, a random tag.
_TAG = re.compile(r"(?P<pid>\d+)-(?P<host>[A-Za-z0-9]+)-[0-9a-f]{8}")
# tensorstore reports an OS failure inside its message: `... [os_error_code='28']`.
_TS_OS_ERROR = re.compile(r"os_error_code='?(\d+)'?")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40] or "host"


def work_name(out_dir: str, kind: str) -> str:
    """A fresh `.OUT.<kind>-PID-HOST-RANDOM` path beside `out_dir` (`kind`: "partial" or "old")."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{base}.{kind}-{os.getpid()}-{_host()}-{uuid.uuid4().hex[:8]}")


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False  # alive under another user, or not a pid we can ask about: leave it
    return False


def _leftovers(out_dir: str, kind: str) -> tuple[list[str], list[str]]:
    """The `.OUT.<kind>-*` paths beside `out_dir`: those left by a process of this host that is gone, and
    those of an older owl_jax, which named no process (`.OUT.<kind>-RANDOM`)."""
    parent, base = os.path.split(out_dir)
    prefix = f".{base}.{kind}-"
    host = _host()
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(prefix))
    except OSError:
        return [], []
    stale, unowned = [], []
    for name in names:
        tag = name[len(prefix) :]
        m = _TAG.fullmatch(tag)
        if m and m["host"] == host and int(m["pid"]) != os.getpid() and _process_gone(int(m["pid"])):
            stale.append(os.path.join(parent, name))
        elif re.fullmatch(r"[0-9a-f]{8}", tag):
            unowned.append(os.path.join(parent, name))
    return stale, unowned


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def clean_stale(out_dir: str) -> list[str]:
    """Remove what runs killed while writing `out_dir` left beside it, saying so in one line (a warning of
    this module's logger); returns the paths removed or put back.

    A stale partial folder is removed. A stale `.OUT.old-*` is the previous output that an `--overwrite`
    had moved aside: it is put back when `OUT` is missing (the replacement never arrived), else removed.
    """
    out_dir = os.path.abspath(out_dir)
    restored: list[str] = []
    removed: list[str] = []
    stale_old, unowned_old = _leftovers(out_dir, OLD)
    for path in stale_old:
        if os.path.lexists(out_dir):
            _remove(path)
            removed.append(path)
            continue
        with contextlib.suppress(OSError):  # if it cannot go back, it stays where it is: it is the user's output
            os.rename(path, out_dir)
            restored.append(path)
    stale_partial, unowned_partial = _leftovers(out_dir, PARTIAL)
    for path in stale_partial:
        _remove(path)
        removed.append(path)
    removed = [p for p in removed if not os.path.lexists(p)]
    notes = []
    if removed:
        names = ", ".join(os.path.basename(p) for p in removed)
        notes.append(
            f"removed {len(removed)} unfinished output{'s' if len(removed) > 1 else ''} of killed runs: {names}"
        )
    if restored:
        notes.append(f"put back {out_dir} from {os.path.basename(restored[0])}, where a killed --overwrite left it")
    unowned = unowned_old + unowned_partial
    if unowned:
        names = ", ".join(os.path.basename(p) for p in unowned)
        notes.append(
            f"left {names} (from an older owl_jax, which did not record its process): remove by hand if no "
            f"conversion into {os.path.basename(out_dir)} is running"
        )
    if notes:
        log.warning("%s (beside %s)", "; ".join(notes), out_dir)
    return restored + removed


def _under(name: str, folder: str | None) -> bool:
    return bool(folder) and (name == folder or name.startswith(folder + os.sep))


def write_error(exc: BaseException, out_dir: str, tmp: str | None = None) -> CheckpointWriteError | None:
    """`exc` (or what it was raised from) as one `CheckpointWriteError` naming `out_dir`, when it is a failure
    to write; None when it is something else (a bad input, an interrupt).

    An `OSError` counts unless it names a file outside the output (then it was reading); tensorstore's
    errors (raised as ValueError by Orbax) count when they carry an `os_error_code`. A `CheckpointError`
    is a verdict on the input and never counts.
    """
    seen = set()
    while exc is not None and id(exc) not in seen and not isinstance(exc, CheckpointError):
        seen.add(id(exc))
        if isinstance(exc, CheckpointWriteError):
            return exc
        if isinstance(exc, OSError) and exc.errno is not None:
            name = os.path.abspath(exc.filename) if isinstance(exc.filename, str) else None
            if name is None or _under(name, tmp) or _under(name, out_dir) or name == os.path.dirname(out_dir):
                where = out_dir
                if name is not None and _under(name, tmp) and name != tmp:
                    where = os.path.join(out_dir, os.path.relpath(name, tmp))
                return CheckpointWriteError(f"cannot write {where}: {os.strerror(exc.errno)}", exc.errno)
            return None
        if isinstance(exc, (ValueError, RuntimeError)):
            m = _TS_OS_ERROR.search(str(exc))
            if m:
                code = int(m.group(1))
                where = out_dir
                part = re.search(re.escape(tmp + os.sep) + r"([^/\\\"']+)", str(exc)) if tmp else None
                if part:  # the top-level entry being written (Orbax writes `params` as `params.orbax-checkpoint-tmp`)
                    where = os.path.join(out_dir, part.group(1).split(".orbax-checkpoint-tmp")[0])
                return CheckpointWriteError(f"cannot write {where}: {os.strerror(code)}", code)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _writing(out_dir: str, fn, *args) -> None:
    try:
        fn(*args)
    except OSError as e:
        raise CheckpointWriteError(f"cannot write {out_dir}: {os.strerror(e.errno or errno.EIO)}", e.errno) from None


@contextlib.contextmanager
def atomic_folder(out_dir: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder that becomes `out_dir` only if the block finishes without error.

    With `overwrite`, an existing `out_dir` (folder or file) is replaced only once the new one is complete,
    and nothing of it is left beside; if the block or the swap fails, it stays as it was.

    Raises:
      FileExistsError: `out_dir` exists and is not empty, and `overwrite` is False.
      CheckpointWriteError: the output cannot be written (disk full, read-only, ...).
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    if os.path.isdir(parent):
        clean_stale(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; choose another folder or pass overwrite=True (--overwrite)"
        )
    _writing(out_dir, os.makedirs, parent, 0o777, True)
    tmp = work_name(out_dir, PARTIAL)
    _writing(out_dir, os.makedirs, tmp)
    try:
        yield tmp
    except BaseException as e:
        _remove(tmp)
        error = write_error(e, out_dir, tmp) if isinstance(e, Exception) else None  # not KeyboardInterrupt
        if error is not None and error is not e:
            raise error from None
        raise
    old = None
    try:
        if os.path.lexists(out_dir):
            old = work_name(out_dir, OLD)
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
    except OSError as e:
        if old is not None and not os.path.lexists(out_dir):
            with contextlib.suppress(OSError):
                os.rename(old, out_dir)  # the previous output goes back in place
        _remove(tmp)
        raise CheckpointWriteError(
            f"cannot move the finished output into place at {out_dir}: {os.strerror(e.errno or errno.EIO)}", e.errno
        ) from None
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def open_output(path: str, mode: str = "w") -> Iterator[Any]:
    """`open(path, mode)` (UTF-8 for text) whose failures name `path`: an `OSError` raised by a write (which
    names no file) or wrapped by the writer (torch.save) gets `path` as its filename, so that the error
    reported names the file that could not be written."""
    try:
        with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.filename is None:
            cause.filename = path
        raise


def copy_side_files(src_dir: str | None, dst_dir: str) -> list[str]:
    """Copy the `SIDE_FILES` present in `src_dir` into `dst_dir`; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if src_dir and os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    return copied
