"""Reading the benchmarks' files with one-line errors that name the file, line and field."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from owl_jax.eval.jsonl import read_jsonl


def find_file(data_dir: str, names: Sequence[str], what: str) -> str:
    """The first of `names` (paths relative to `data_dir`) that exists; FileNotFoundError listing them all."""
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{data_dir} has no {what} (looked for {', '.join(names)})")


def find_dir(data_dir: str, names: Sequence[str], what: str) -> str:
    """The first of the folders `names` (relative to `data_dir`, "" for itself) that exists."""
    for name in names:
        path = os.path.join(data_dir, name)
        if os.path.isdir(path):
            return os.path.normpath(path)
    raise FileNotFoundError(f"{data_dir} has no {what} folder (looked for {', '.join(n or '.' for n in names)})")


def read_json(path: str) -> Any:
    """The JSON value of a file; ValueError naming the file and position when it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None


def read_json_lines(path: str) -> list[tuple[str, dict]]:
    """`(where, object)` per line of a JSON-lines file, `where` being "file:line"."""
    return [(f"{path}:{n}", row) for n, row in read_jsonl(path)]


def field(record: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`record[key]`, checked to be a `kind` (bool is never an int); ValueError naming `where` and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{where}: no field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        names = "/".join(k.__name__ for k in _kinds(kind))
        raise ValueError(f"{where}: field {key!r} must be {names}, got {value!r}"[:300])
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
