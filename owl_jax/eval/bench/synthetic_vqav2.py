"""The demo's held-out synthetic questions written in VQAv2's validation layout, to run through `--task vqav2`.

`export_vqav2(eval_jsonl, out_dir)` reads the held-out file that `owl_jax.data.synthetic.generate` writes
(`eval.jsonl`, images relative to its folder) and writes `out_dir` as `owl_jax.eval.bench.layouts.vqav2`
reads it: the questions file, the annotations file and `val2014/COCO_val2014_<image_id>.jpg`.

VQAv2 holds one question about one image, so only the single-image, single-turn types go over: color,
count, position and shape. Two-image questions, multi-turn conversations and text-only questions are left
out (counted in the return value). Each question gets the same answer from all 10 "annotators": the demo's
answer in VQA's normalisation (`normalize_answer`: "two" becomes "2"), which is how VQAv2 stores human
answers; its `answer_type` is "number" for count and "other" otherwise, and its `question_type` is the
demo's question type, so VQAv2's per-question-type accuracy is the demo's per-type table. Image ids count
from 1 in file order; question id = 1000 x image id, as in VQAv2. Images are re-encoded as JPEG (quality
95, no chroma subsampling), so the model sees them with slight compression artefacts.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from PIL import Image

from owl_jax.data.synthetic import parse_templated_text, read_jsonl
from owl_jax.eval.bench.layouts.vqav2 import ANNOTATIONS_FILE, QUESTIONS_FILE, image_name
from owl_jax.eval.bench.normalize import normalize_answer

EXPORTED_TYPES = ("color", "count", "position", "shape")
ANSWERS_PER_QUESTION = 10
SUBTYPE = "val2014"


def export_vqav2(eval_jsonl: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write the single-image, single-turn questions of `eval_jsonl` into `out_dir` in VQAv2's layout.

    Returns `{"questions": n, "by_type": {type: n}, "skipped": {type: n}}`.
    """
    eval_jsonl, out_dir = os.fspath(eval_jsonl), os.fspath(out_dir)
    root = os.path.dirname(eval_jsonl)
    images_dir = os.path.join(out_dir, SUBTYPE)
    os.makedirs(images_dir, exist_ok=True)
    questions, annotations = [], []
    exported, skipped = Counter(), Counter()
    for row in read_jsonl(eval_jsonl):
        question_type = row.get("question_type")
        images = row.get("image") or []
        turns, num_images = parse_templated_text(row["text"])
        if question_type not in EXPORTED_TYPES or len(images) != 1 or num_images != 1 or len(turns) != 1:
            skipped[question_type] += 1
            continue
        image_id = len(questions) + 1
        qid = image_id * 1000
        with Image.open(os.path.join(root, images[0])) as im:
            im.convert("RGB").save(os.path.join(images_dir, image_name(SUBTYPE, image_id)), quality=95, subsampling=0)
        question, answer = turns[0]
        answer = normalize_answer(answer)
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": i + 1}
                    for i in range(ANSWERS_PER_QUESTION)
                ],
                "multiple_choice_answer": answer,
                "answer_type": "number" if question_type == "count" else "other",
                "question_type": question_type,
            }
        )
        exported[question_type] += 1
    header = {"data_type": "mscoco", "data_subtype": SUBTYPE}
    _write_json(os.path.join(out_dir, QUESTIONS_FILE), {**header, "task_type": "Open-Ended", "questions": questions})
    _write_json(os.path.join(out_dir, ANNOTATIONS_FILE), {**header, "annotations": annotations})
    return {"questions": len(questions), "by_type": dict(exported), "skipped": dict(skipped)}


def _write_json(path: str, value: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)
