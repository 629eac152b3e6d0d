"""POPE (object hallucination) metrics as LLaVA's `llava/eval/eval_pope.py` computes them, per split.

Answer parsing (`parse_yes_no`): keep the text before its first period, delete commas, split on single
spaces; the answer is "no" when one of those words is exactly "No", "no" or "not", and "yes" otherwise
(so an empty or evasive answer counts as "yes"; "NO" or "Not" are not negations, as in LLaVA).

"yes" is the positive class. Per split: accuracy = (TP+TN)/N, precision = TP/(TP+FP), recall = TP/(TP+FN),
F1 = 2PR/(P+R), yes_ratio = share of answers parsed "yes". A ratio with a zero denominator is reported
as 0.0 (LLaVA's script would divide by zero there).

Inputs:
- `predictions`: `{question_id: answer text}` (or a dict with a `"text"` string, one row of LLaVA's answers);
- `ground_truth`: `{question_id: {"label": "yes" | "no", "category": split}}`; the splits are
  "random", "popular" and "adversarial" (any names are accepted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from owl_jax.eval.bench.inputs import prediction_text, require_keys

SPLITS = ("random", "popular", "adversarial")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def parse_yes_no(text: str) -> str:
    """'yes' or 'no' for a free-text answer, by LLaVA's POPE rule (see the module docstring)."""
    first = text.split(".", 1)[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def confusion_metrics(tp: int, fp: int, tn: int, fn: int) -> dict:
    """The POPE metrics (0..1) of one confusion matrix, "yes" positive, and the counts themselves."""
    n = tp + fp + tn + fn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, n),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "n": n,
    }


def evaluate_pope(predictions: Mapping[Any, Any], ground_truth: Mapping[Any, Mapping[str, Any]]) -> dict:
    """POPE metrics per split.

    Returns `{"splits": {split: {accuracy, precision, recall, f1, yes_ratio, tp, fp, tn, fn, n}},
    "mean": {metric: mean over splits}}`, metrics in 0..1; splits appear in the order random, popular,
    adversarial, then any others in order of appearance.
    """
    if not ground_truth:
        raise ValueError("ground_truth is empty")
    counts: dict[str, dict[str, int]] = {}
    for qid, gt in ground_truth.items():
        require_keys(gt, ("label", "category"), f"question_id {qid!r} ground truth")
        label = str(gt["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"question_id {qid!r}: label must be 'yes' or 'no', got {gt['label']!r}")
        pred = prediction_text(predictions, qid)
        said_yes, is_yes = parse_yes_no(pred) == "yes", label == "yes"
        c = counts.setdefault(gt["category"], {"tp": 0, "fp": 0, "tn": 0, "fn": 0})
        c[("t" if said_yes == is_yes else "f") + ("p" if said_yes else "n")] += 1
    order = [s for s in SPLITS if s in counts] + [s for s in counts if s not in SPLITS]
    splits = {s: confusion_metrics(**counts[s]) for s in order}
    mean = {m: sum(r[m] for r in splits.values()) / len(splits) for m in METRICS}
    return {"splits": splits, "mean": mean}
