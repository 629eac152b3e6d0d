"""ScienceQA accuracy as LLaVA's `llava/eval/eval_science_qa.py` computes it; IMG = questions with an image.

Answer extraction (`extract_letter`), with the options "A".."E":
1. the whole answer is an option letter: "B";
2. it starts with an option letter, a period and a space: "B. The magnet ...";
3. the pattern `The answer is ([A-Z]).` (the final "." matching any character) occurs exactly once;
otherwise the answer failed. A letter beyond the question's choices, a failed answer and a question with no
prediction are all wrong.

Inputs:
- `predictions`: `{question_id: answer text}` (or a dict with a `"text"` string);
- `ground_truth`: `{question_id: {"answer": index of the right choice, "choices": [...], "image": name or
  None}}`, as in ScienceQA's `problems.json` (restricted to the split to score).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from owl_jax.eval.bench.inputs import answer_text, require_keys

OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def extract_letter(text: str) -> str:
    """The option letter of a free-text answer by LLaVA's ScienceQA rule, or `FAILED` (module docstring)."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def evaluate_scienceqa(predictions: Mapping[Any, Any], ground_truth: Mapping[Any, Mapping[str, Any]]) -> dict:
    """ScienceQA accuracy over the image questions (IMG, the number reported) and over all questions.

    Returns `{"img_accuracy": % or None, "img_n": int, "accuracy": %, "n": int, "failed": int,
    "per_question": {question_id: bool}}`, percentages in 0..100; `img_accuracy` is None when no question has
    an image; `failed` counts questions whose answer gave no letter, missing predictions included.
    """
    if not ground_truth:
        raise ValueError("ground_truth is empty")
    per_question: dict[Any, bool] = {}
    img: list[bool] = []
    failed = 0
    for qid, gt in ground_truth.items():
        where = f"question_id {qid!r}"
        require_keys(gt, ("answer", "choices"), f"{where} ground truth")
        n_choices = len(gt["choices"])
        if not isinstance(gt["answer"], int) or not 0 <= gt["answer"] < n_choices:
            raise ValueError(f"{where}: answer must be a choice index below {n_choices}, got {gt['answer']!r}")
        text = answer_text(predictions[qid], f"{where} prediction") if qid in predictions else FAILED
        letter = extract_letter(text)
        failed += letter == FAILED
        idx = OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1
        per_question[qid] = idx == gt["answer"]
        if gt.get("image"):
            img.append(per_question[qid])
    right = list(per_question.values())
    return {
        "img_accuracy": 100.0 * sum(img) / len(img) if img else None,
        "img_n": len(img),
        "accuracy": 100.0 * sum(right) / len(right),
        "n": len(right),
        "failed": failed,
        "per_question": per_question,
    }
