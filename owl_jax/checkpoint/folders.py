"""Output folders: written under a temporary name and renamed into place only once complete, with the
side files (tokenizer, generation config, ...) that travel with the weights.

An interrupted or failed conversion therefore never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

# Files that travel with the weights when present in the source folder.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "preprocessor_config.json",
)


@contextlib.contextmanager
def atomic_folder(out_dir: str, *, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary folder that becomes `out_dir` only if the block finishes without error.

    Raises:
      FileExistsError: `out_dir` exists and is not empty, and `overwrite` is False.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists and is not empty; choose another folder or pass overwrite=True (--overwrite)"
        )
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
    """Copy the `SIDE_FILES` present in `src_dir` into `dst_dir`; returns the names copied."""
    copied = []
    for name in SIDE_FILES:
        if src_dir and os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    return copied
