"""VQAv2 in its official layout (visualqa.org), or LLaVA's test-dev question file.

Validation, scored here with the official metric (`owl_jax.eval.bench.vqav2`)::

    DATA/
      v2_OpenEnded_mscoco_val2014_questions.json  {"data_subtype": "val2014",
                                                   "questions": [{"image_id", "question", "question_id"}, ...]}
      v2_mscoco_val2014_annotations.json          {"annotations": [{"question_id", "image_id", "answers":
                                                   [{"answer": ...}, ...10], "multiple_choice_answer",
                                                   "answer_type", "question_type"}, ...]}
      val2014/COCO_val2014_000000000042.jpg       COCO_<data_subtype>_<image_id as 12 digits>.jpg

Without those two files, LLaVA's test-dev layout (scored by the VQA evaluation server)::

    DATA/
      llava_vqav2_mscoco_test-dev2015.jsonl  one {"question_id", "image", "text", "category"} a line; "text"
                                             already ends with LLaVA's short-answer instruction
      llava_vqav2_mscoco_test2015.jsonl      optional: every test question; those not asked are submitted
                                             with an empty answer, as the server wants all of them
      test2015/COCO_test2015_000000000001.jpg

The test-dev run writes `vqav2_test-dev2015_submission.json` (`[{"question_id", "answer"}]`, answers in the
official normalisation, as LLaVA's `convert_vqav2_for_submission.py` submits them) instead of metrics.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from owl_jax.eval.bench.layouts.files import field, find_dir, read_json, read_json_lines
from owl_jax.eval.bench.normalize import normalize_answer
from owl_jax.eval.bench.table import markdown_table
from owl_jax.eval.bench.tasks import SHORT_ANSWER, Item, Task
from owl_jax.eval.bench.vqav2 import evaluate_vqav2

QUESTIONS_FILE = "v2_OpenEnded_mscoco_val2014_questions.json"
ANNOTATIONS_FILE = "v2_mscoco_val2014_annotations.json"
TEST_DEV_FILE = "llava_vqav2_mscoco_test-dev2015.jsonl"
TEST_FILE = "llava_vqav2_mscoco_test2015.jsonl"
SUBMISSION_FILE = "vqav2_test-dev2015_submission.json"


def image_name(data_subtype: str, image_id: int) -> str:
    """The COCO file name of an image: `COCO_val2014_000000000042.jpg`."""
    return f"COCO_{data_subtype}_{image_id:012d}.jpg"


def load(data_dir: str) -> Task:
    """The validation set when its question and annotation files are in `data_dir`, else LLaVA's test-dev."""
    questions = os.path.join(data_dir, QUESTIONS_FILE)
    annotations = os.path.join(data_dir, ANNOTATIONS_FILE)
    if os.path.isfile(questions) or os.path.isfile(annotations):
        return load_val(questions, annotations, data_dir)
    if os.path.isfile(os.path.join(data_dir, TEST_DEV_FILE)):
        return load_test_dev(data_dir)
    raise FileNotFoundError(
        f"{data_dir} has neither {QUESTIONS_FILE} with {ANNOTATIONS_FILE} (validation) nor {TEST_DEV_FILE} (test-dev)"
    )


def load_val(questions_path: str, annotations_path: str, data_dir: str) -> Task:
    """The official validation questions, with their human answers as ground truth."""
    for path in (questions_path, annotations_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist (VQAv2 needs both {QUESTIONS_FILE} and {ANNOTATIONS_FILE})")
    q_json = read_json(questions_path)
    questions = field(q_json, "questions", list, questions_path)
    subtype = field(q_json, "data_subtype", str, questions_path) if "data_subtype" in q_json else "val2014"
    images = find_dir(data_dir, (subtype, "images"), "image")
    ground_truth: dict[int, dict] = {}
    a_json = read_json(annotations_path)
    for i, ann in enumerate(field(a_json, "annotations", list, annotations_path)):
        where = f"{annotations_path}: annotations[{i}]"
        qid = field(ann, "question_id", int, where)
        answers = field(ann, "answers", list, where)
        for j, a in enumerate(answers):
            field(a, "answer", str, f"{where} answers[{j}]")
        ground_truth[qid] = {
            "answers": [a["answer"] for a in answers],
            "answer_type": field(ann, "answer_type", str, where),
            "question_type": field(ann, "question_type", str, where),
        }
    items, truth = [], {}
    for i, q in enumerate(questions):
        where = f"{questions_path}: questions[{i}]"
        qid = field(q, "question_id", int, where)
        if qid not in ground_truth:
            raise ValueError(f"{where}: question_id {qid} has no annotation in {annotations_path}")
        image = os.path.join(images, image_name(subtype, field(q, "image_id", int, where)))
        question = field(q, "question", str, where)
        items.append(Item(str(qid), qid, f"{question}\n{SHORT_ANSWER}", image, qid))
        truth[qid] = ground_truth[qid]
    return Task("vqav2", items, truth, evaluate_vqav2, table, [questions_path, annotations_path])


def load_test_dev(data_dir: str) -> Task:
    """LLaVA's test-dev question file: predictions and a submission file, no metric."""
    path = os.path.join(data_dir, TEST_DEV_FILE)
    images = find_dir(data_dir, ("test2015", "images"), "image")
    items = []
    for where, row in read_json_lines(path):
        qid = field(row, "question_id", int, where)
        image = os.path.join(images, field(row, "image", str, where))
        items.append(Item(str(qid), qid, field(row, "text", str, where), image, qid))
    every = [row["question_id"] for _, row in _rows_if_present(os.path.join(data_dir, TEST_FILE))]

    def submission(answers: Mapping[Any, str]) -> tuple[str, list[dict]]:
        rows = [{"question_id": qid, "answer": normalize_answer(text)} for qid, text in answers.items()]
        rows += [{"question_id": qid, "answer": ""} for qid in every if qid not in answers]
        return SUBMISSION_FILE, rows

    files = [path] + ([os.path.join(data_dir, TEST_FILE)] if every else [])
    return Task("vqav2", items, {}, None, table, files, submission)


def _rows_if_present(path: str) -> list[tuple[str, dict]]:
    if not os.path.isfile(path):
        return []
    rows = read_json_lines(path)
    for where, row in rows:
        field(row, "question_id", int, where)
    return rows


def table(results: dict) -> str:
    """Overall accuracy and accuracy per answer type, in percent."""
    row = {"overall": results["overall"], **results["per_answer_type"], "questions": results["n"]}
    return markdown_table({"VQAv2 accuracy (%)": row})
