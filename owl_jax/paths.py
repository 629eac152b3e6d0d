"""Paths of a run's outputs and data, on local disk or in an object store (`gs://bucket/...`).

Every such path goes through `etils.epath.Path`, which Orbax takes as well: a local path is made absolute
(as `os.path.abspath` would), a URL-like one (`gs://`, `s3://`, ...) is kept exactly as written and is never
resolved, made absolute or created on local disk. Object stores have no rename, so what is written
atomically on local disk (a temporary name, then a rename) is written file by file there, the file that
marks the whole as complete last.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence

from etils import epath

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (`gs://...`, `s3://...`) rather than local disk."""
    return bool(_SCHEME.match(os.fspath(path)))


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an `epath.Path`: a local one absolute, a remote one (`gs://...`) unchanged."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def upload_folder(
    local: str | os.PathLike, remote: epath.Path, *, last: Sequence[str] = (), replace: bool = False
) -> None:
    """Copy the files under the local folder `local` into `remote` (with `replace`: instead of what it held).

    Not atomic (an object store has no rename): `remote` is filled file by file (after being removed, with
    `replace`), the files named in `last` (relative names) after all others, so a reader that checks for
    them never sees a partial folder as complete.
    """
    if replace and remote.exists():
        remote.rmtree()
    files = []
    for folder, _, names in os.walk(local):
        files += [os.path.relpath(os.path.join(folder, n), local) for n in names]
    files.sort(key=lambda name: (list(last).index(name) + 1 if name in last else 0, name))
    for name in files:
        target = remote / name.replace(os.sep, "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(local, name), "rb") as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst)


def move_folder(src: epath.Path, dst: epath.Path) -> None:
    """Move the folder `src` to `dst`, which must not exist yet.

    Local: one rename. Remote: an object store has no rename, so every file is copied, then `src` removed
    (a move cut short leaves `src` whole, or partly removed once `dst` is complete).
    """
    if not is_remote(src):
        src.rename(dst)
        return
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; cannot move {src} there")
    for name in _files_under(src):
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with (src / name).open("rb") as a, target.open("wb") as b:
            shutil.copyfileobj(a, b)
    src.rmtree()


def _files_under(folder: epath.Path, prefix: str = "") -> list[str]:
    """The files under `folder`, as names relative to it (`a/b.json`), by listing each folder in turn."""
    names = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.is_dir():
            names += _files_under(entry, f"{prefix}{entry.name}/")
        else:
            names.append(prefix + entry.name)
    return names
