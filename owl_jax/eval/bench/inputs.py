"""Checks on the plain-Python inputs that the benchmark metrics share, with one-line errors naming the field."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def require_keys(record: Mapping[str, Any], keys: Iterable[str], where: str) -> None:
    """Raise `KeyError` naming the first of `keys` missing from `record` (`where` says whose record it is)."""
    if not isinstance(record, Mapping):
        raise TypeError(f"{where}: expected a dict, got {type(record).__name__}")
    for key in keys:
        if key not in record:
            raise KeyError(f"{where}: no {key!r}")


def answer_text(value: Any, where: str, key: str = "text") -> str:
    """A model's answer: the string itself, or the `key` string of a dict (one row of an answers file)."""
    if isinstance(value, Mapping):
        require_keys(value, (key,), where)
        value = value[key]
    if not isinstance(value, str):
        raise TypeError(f"{where}: answer must be a string, got {type(value).__name__}")
    return value


def prediction_text(predictions: Mapping[Any, Any], qid: Any, key: str = "text") -> str:
    """The answer text predicted for question `qid`; `KeyError` naming it when there is none."""
    if qid not in predictions:
        raise KeyError(f"question_id {qid!r}: no prediction")
    return answer_text(predictions[qid], f"question_id {qid!r} prediction", key)
