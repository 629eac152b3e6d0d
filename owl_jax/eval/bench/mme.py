"""MME scores as the benchmark's official tool computes them (`eval_tool/calculation.py`), as LLaVA runs it.

Answer parsing (`parse_mme_answer`), on the lower-cased answer: "yes" or "no" as is; otherwise "yes" when
"yes" occurs in its first 4 characters, else "no" when "no" does (so "not sure" counts as "no"), else
"other", which is wrong whatever the label.

Per subtask: acc = share of questions right; acc+ = share of images whose questions (two per image in
MME) are all right; score = 100·acc + 100·acc+ (at most 200). The perception total sums the scores of
`PERCEPTION` (at most 2000), the cognition total those of `COGNITION` (at most 800).

Inputs:
- `predictions`: `{question_id: answer text}` (or a dict with a `"text"` string);
- `ground_truth`: `{question_id: {"category": subtask, "image": image name, "answer": "Yes" | "No"}}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from owl_jax.eval.bench.inputs import prediction_text, require_keys

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
QUESTIONS_PER_IMAGE = 2


def parse_mme_answer(text: str) -> str:
    """'yes', 'no' or 'other' for a free-text answer, by the official MME rule (see the module docstring)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def evaluate_mme(predictions: Mapping[Any, Any], ground_truth: Mapping[Any, Mapping[str, Any]]) -> dict:
    """MME acc, acc+ and score per subtask, with the perception and cognition totals.

    Returns `{"subtasks": {name: {"acc": %, "acc_plus": %, "score": float, "questions": int, "images": int,
    "other": int}}, "perception": float, "cognition": float, "missing": {"perception": [...],
    "cognition": [...]}}`; acc and acc+ are in 0..100, `other` counts answers parsed as neither yes nor no.
    A total sums the subtasks present; `missing` lists those of the official lists that have no questions.
    Subtasks outside both lists are scored but in neither total. Every image needs exactly two questions.
    """
    if not ground_truth:
        raise ValueError("ground_truth is empty")
    images: dict[str, dict[Any, list[bool]]] = {}
    others: dict[str, int] = {}
    for qid, gt in ground_truth.items():
        require_keys(gt, ("category", "image", "answer"), f"question_id {qid!r} ground truth")
        label = str(gt["answer"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"question_id {qid!r}: answer must be 'Yes' or 'No', got {gt['answer']!r}")
        pred = prediction_text(predictions, qid)
        parsed = parse_mme_answer(pred)
        subtask = gt["category"]
        images.setdefault(subtask, {}).setdefault(gt["image"], []).append(parsed == label)
        others[subtask] = others.get(subtask, 0) + (parsed == "other")
    subtasks = {}
    for subtask, per_image in images.items():
        for image, right in per_image.items():
            if len(right) != QUESTIONS_PER_IMAGE:
                raise ValueError(
                    f"category {subtask!r} image {image!r}: {len(right)} questions, expected {QUESTIONS_PER_IMAGE}"
                )
        n_questions = sum(len(r) for r in per_image.values())
        acc = 100.0 * sum(sum(r) for r in per_image.values()) / n_questions
        acc_plus = 100.0 * sum(all(r) for r in per_image.values()) / len(per_image)
        subtasks[subtask] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
            "questions": n_questions,
            "images": len(per_image),
            "other": others[subtask],
        }
    return {
        "subtasks": subtasks,
        "perception": sum(subtasks[t]["score"] for t in PERCEPTION if t in subtasks),
        "cognition": sum(subtasks[t]["score"] for t in COGNITION if t in subtasks),
        "missing": {
            "perception": [t for t in PERCEPTION if t not in subtasks],
            "cognition": [t for t in COGNITION if t not in subtasks],
        },
    }
