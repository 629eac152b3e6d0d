"""VQAv2 accuracy as the official VQA evaluation computes it (GT-Vision-Lab/VQA, `vqaEval.py`).

For one question with human answers h_1..h_n (n = 10 in VQAv2) and a normalised prediction p, the accuracy
is the mean over the n subsets that leave one human out of min(1, #{humans in the subset who said p} / 3).
With 3 matching humans out of 10 this is 0.9, not 1: leaving out one of the 3 leaves only 2.

The prediction goes through `normalize_answer`. The human answers are taken as stored (the dataset's are
already normalised), except that when they disagree each goes through `process_punctuation`, as officially.

Inputs:
- `predictions`: `{question_id: answer}`; the answer is a string or a dict with an `"answer"` string
  (one row of a results file);
- `ground_truth`: `{question_id: {"answers": [...], "answer_type": str, "question_type": str (optional)}}`;
  each human answer is a string or a dict with an `"answer"` string (the official annotation format).

Every ground-truth question needs a prediction (the official loader refuses a results file that misses
one); predictions for questions absent from the ground truth are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from owl_jax.eval.bench.inputs import answer_text, prediction_text, require_keys
from owl_jax.eval.bench.normalize import normalize_answer, process_punctuation


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy (0..1) of one raw predicted answer against the raw human answers, averaged over leave-one-out."""
    if not human_answers:
        raise ValueError("human_answers is empty")
    pred = normalize_answer(prediction)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(h) for h in humans]
    matches = sum(h == pred for h in humans)
    total = 0.0
    for h in humans:
        others = matches - (h == pred)
        total += min(1.0, others / 3)
    return total / len(humans)


def evaluate_vqav2(predictions: Mapping[Any, Any], ground_truth: Mapping[Any, Mapping[str, Any]]) -> dict:
    """Official VQAv2 accuracy.

    Returns `{"overall": %, "per_answer_type": {type: %}, "per_question_type": {type: %}, "n": int,
    "per_question": {question_id: 0..1}}`; percentages are in 0..100 and not rounded (the official script
    rounds to 2 decimals for display). Answer types in VQAv2 are "yes/no", "number" and "other".
    """
    if not ground_truth:
        raise ValueError("ground_truth is empty")
    per_question: dict[Any, float] = {}
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for qid, gt in ground_truth.items():
        require_keys(gt, ("answers", "answer_type"), f"question_id {qid!r} ground truth")
        humans = [
            answer_text(a, f"question_id {qid!r} human answer {i}", "answer") for i, a in enumerate(gt["answers"])
        ]
        acc = question_accuracy(prediction_text(predictions, qid, "answer"), humans)
        per_question[qid] = acc
        by_answer_type.setdefault(gt["answer_type"], []).append(acc)
        if "question_type" in gt:
            by_question_type.setdefault(gt["question_type"], []).append(acc)

    def pct(values: Sequence[float]) -> float:
        return 100.0 * sum(values) / len(values)

    return {
        "overall": pct(list(per_question.values())),
        "per_answer_type": {t: pct(v) for t, v in by_answer_type.items()},
        "per_question_type": {t: pct(v) for t, v in by_question_type.items()},
        "n": len(per_question),
        "per_question": per_question,
    }
