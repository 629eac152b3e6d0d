"""Tiny made-up benchmark folders in each benchmark's official layout, for the runner and loader tests.

Each `make_*` writes a folder under the path given and returns it; `TASK_DATA` maps a `--task` name to its
maker. The images are small random pictures (the tests check plumbing, not answers).
"""

from __future__ import annotations

import base64
import csv
import io
import json

import numpy as np
from PIL import Image

IMAGE_SIZE = (20, 16)


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*IMAGE_SIZE[::-1], 3), dtype=np.uint8))


def _save(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _picture(seed).save(path)


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_vqav2(folder, n_images: int = 3):
    """Two questions per image; question ids image_id * 1000 + k, answers of every answer type."""
    folder.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    kinds = [("yes/no", "is there", ["yes"] * 7 + ["no"] * 3), ("number", "how many", ["2"] * 4 + ["3"] * 6)]
    for image_id in range(1, n_images + 1):
        _save(folder / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", image_id)
        for k, (answer_type, question_type, answers) in enumerate(kinds):
            qid = image_id * 1000 + k
            questions.append({"image_id": image_id, "question": f"{question_type} {qid}?", "question_id": qid})
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
                    ],
                    "multiple_choice_answer": answers[0],
                    "answer_type": answer_type,
                    "question_type": question_type,
                }
            )
    (folder / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"data_subtype": "val2014", "questions": questions})
    )
    (folder / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return folder


CAPTIONS = {
    11: ["A red circle on the left.", "a red ball on the left side", "A small red round shape."],
    12: ["Two blue squares next to each other.", "two blue boxes", "Blue squares, two of them."],
    13: ["A green triangle in the middle.", "a green triangle", "The triangle is green."],
}


def make_coco_caption(folder):
    """BLIP's coco_karpathy_test.json with three images."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id, captions in CAPTIONS.items():
        name = f"val2014/COCO_val2014_{image_id:012d}.jpg"
        _save(folder / name, image_id)
        rows.append({"image": name, "caption": captions})
    (folder / "coco_karpathy_test.json").write_text(json.dumps(rows))
    return folder


def make_pope(folder, per_split: int = 2):
    """Two splits of POPE question files (ids restart in each, as in the release)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, split in enumerate(("random", "adversarial")):
        rows = []
        for q in range(1, per_split + 1):
            image = f"COCO_val2014_{100 + q:012d}.jpg"
            _save(folder / "val2014" / image, 100 + q)
            label = "yes" if (q + s) % 2 else "no"
            rows.append({"question_id": q, "image": image, "text": f"Is there a thing {q}?", "label": label})
        _jsonl(folder / f"coco_pope_{split}.json", rows)
    return folder


def make_mme(folder):
    """Two subtasks: one in the split layout (images/ + questions_answers_YN/), one flat."""
    folder.mkdir(parents=True, exist_ok=True)
    root = folder / "MME_Benchmark_release_version"
    for i, stem in enumerate(("10002", "10003")):
        _save(root / "artwork" / "images" / f"{stem}.jpg", 200 + i)
        qa = root / "artwork" / "questions_answers_YN" / f"{stem}.txt"
        qa.parent.mkdir(parents=True, exist_ok=True)
        qa.write_text(
            f"Is this art {stem}? Please answer yes or no.\tYes\nIs it a photo? Please answer yes or no.\tNo\n"
        )
    _save(root / "count" / "000000006040.png", 210)
    (root / "count" / "000000006040.txt").write_text(
        "Are there two dogs? Please answer yes or no.\tNo\r\nIs there one dog? Please answer yes or no.\tYes\r\n"
    )
    return folder


def make_mmbench(folder):
    """A dev TSV with a 2-option and a 3-option question, one with a hint."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (options, answer, hint) in enumerate(
        [(["cat", "dog"], "B", "Look closely."), (["red", "green", "blue"], "A", "")]
    ):
        buffer = io.BytesIO()
        _picture(300 + index).save(buffer, format="JPEG")
        row = {"index": index, "question": f"Which one {index}?", "hint": hint or "nan", "answer": answer}
        row.update({letter: text for letter, text in zip("ABCD", options)})
        row.update(
            {"category": "attribute" if index else "animal", "image": base64.b64encode(buffer.getvalue()).decode()}
        )
        rows.append(row)
    with open(folder / "mmbench_dev_20230712.tsv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"], delimiter="\t"
        )
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return folder


def make_scienceqa(folder):
    """Three test problems, two with an image; one train problem."""
    folder.mkdir(parents=True, exist_ok=True)
    problems = {
        "5": {
            "question": "Which is a mammal?",
            "choices": ["frog", "cow"],
            "answer": 1,
            "hint": "",
            "image": "image.png",
            "split": "test",
        },
        "6": {
            "question": "What is 2+2?",
            "choices": ["3", "4", "5"],
            "answer": 1,
            "hint": "Count.",
            "image": None,
            "split": "test",
        },
        "7": {
            "question": "Which is hotter?",
            "choices": ["ice", "fire"],
            "answer": 1,
            "hint": "Look at the picture.",
            "image": "image.png",
            "split": "test",
        },
        "8": {
            "question": "Train only?",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "split": "train",
        },
    }
    for pid in ("5", "7"):
        _save(folder / "images" / "test" / pid / "image.png", 400 + int(pid))
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"train": ["8"], "val": [], "test": ["5", "6", "7"]}))
    return folder


TASK_DATA = {
    "vqav2": make_vqav2,
    "coco_caption": make_coco_caption,
    "pope": make_pope,
    "mme": make_mme,
    "mmbench": make_mmbench,
    "scienceqa_img": make_scienceqa,
}
