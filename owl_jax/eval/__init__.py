"""Evaluation: OwlEval answers (`owl_jax.eval.owleval`) and their grading by a judge model (`owl_jax.eval.judge`).

Importing this package loads neither JAX nor a model. Names are resolved on first use, so that
`python -m owl_jax.eval.owleval` does not find its own module already imported by the package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Question": "owleval",
    "answer_owleval": "owleval",
    "conversations": "owleval",
    "load_questions": "owleval",
    "read_jsonl": "jsonl",
    "grade_answers": "judge",
    "summarize": "tables",
    "format_tables": "tables",
    "parse_grade": "judge",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'owl_jax.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"owl_jax.eval.{_EXPORTS[name]}"), name)
