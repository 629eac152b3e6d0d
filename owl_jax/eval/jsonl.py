"""JSON-lines files of rows written as they are produced (answers, grades), and read back to resume.

A run appends its rows to `OUT.partial` as each arrives (one JSON line each, flushed), so an interrupted
run keeps them, and writes `OUT` itself only once it is complete, atomically, so `OUT` is never a
half-written file and an earlier `OUT` survives a failed run. `--resume` reads both (`resume_rows`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable

PARTIAL_SUFFIX = ".partial"


def read_jsonl(path: str | os.PathLike, *, drop_cut_end: bool = False) -> list[tuple[int, dict]]:
    """`(line number, object)` for every non-blank line of a JSON-lines file; ValueError names file:line.

    With `drop_cut_end`, a last line that has no line break and does not parse (what a process killed in
    the middle of a write leaves) is dropped with a warning on stderr instead.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 text (byte {e.start + 1})"
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e.msg} at column {e.colno})"
        else:
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
            continue
        if drop_cut_end and n == len(lines):  # the last line, with no line break after it
            warning = f"warning: {path}:{n}: last line is cut short (an interrupted write); dropped, to do again"
            print(warning, file=sys.stderr)
            continue
        raise ValueError(f"{path}:{n}: {problem}")
    return rows


def partial_path(path: str | os.PathLike) -> str:
    """Where the rows of an unfinished run writing `path` are kept."""
    return os.fspath(path) + PARTIAL_SUFFIX


def resume_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of `path` and then of its partial file (either may be missing), for `--resume`.

    A cut last line of either is dropped with a warning; any other damaged line raises ValueError.
    """
    rows = []
    for p in (os.fspath(path), partial_path(path)):
        if os.path.exists(p):
            rows += [row for _, row in read_jsonl(p, drop_cut_end=True)]
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows one JSON object a line, atomically (a temporary sibling replaces `path` when complete)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class PartialWriter:
    """Appends rows to `partial_path(path)` as they arrive, one flushed JSON line each.

    The file is created at the first `append` and starts with `carried` (the rows an earlier run left,
    being resumed), so that after an interruption it holds everything done so far. `finish` removes it once
    the caller has written the complete `path`.
    """

    def __init__(self, path: str | os.PathLike, carried: Iterable[dict] = ()):
        self.path = partial_path(path)
        self.carried = list(carried)
        self.new = 0
        self._file = None

    @property
    def saved(self) -> int:
        """How many rows the partial file holds (0 while it was not needed)."""
        return len(self.carried) + self.new if self._file is not None else 0

    def append(self, rows: Iterable[dict]) -> None:
        if self._file is None:  # replaces what an earlier run left, which `carried` holds, in one step
            write_jsonl(self.path, self.carried)
            self._file = open(self.path, "a", encoding="utf-8")
        self.new += self._write(rows)

    def _write(self, rows: Iterable[dict]) -> int:
        count = 0
        for row in rows:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        self._file.flush()
        return count

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def finish(self) -> None:
        """Close and remove the partial file (call after the complete file is written)."""
        self.close()
        if os.path.exists(self.path):
            os.remove(self.path)

    def __enter__(self) -> PartialWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
