"""Grade rows: the grades a judge gives, and which rows of an earlier run `--resume` keeps.

A row (`owl_jax.eval.judge.grade_item`) records the judge model, the answers file, the model_id, the
question_id and the answer text it graded, so a kept grade is one of the same answer by the same judge; a
row without a grade ("?": the judge was down or gave none) is graded again.
"""

from __future__ import annotations

from collections.abc import Iterable

GRADES = ("A", "B", "C", "D")
UNPARSEABLE = "?"
SCORES = {"A": 3, "B": 2, "C": 1, "D": 0}
KEY_FIELDS = ("judge_model", "model_id", "answers_file", "question_id", "answer")

Key = tuple


def grade_key(judge_model: str, model_id: str, answers_file: str, question_id: int, answer: str) -> Key:
    """What identifies a grade: who graded which answer."""
    return (judge_model, model_id, answers_file, question_id, answer)


def row_key(row: dict) -> Key | None:
    """The key of a grade row, or None for a row that lacks one of `KEY_FIELDS` (it is graded again)."""
    values = [row.get(k) for k in KEY_FIELDS]
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        return None
    return grade_key(*values)


def kept_grades(rows: Iterable[dict], judge_model: str) -> dict[Key, dict]:
    """The rows that hold a grade by `judge_model`, by key (a later row of the same key wins)."""
    kept = {}
    for row in rows:
        key = row_key(row)
        if key is not None and key[0] == judge_model and row.get("grade") in GRADES:
            kept[key] = row
    return kept
