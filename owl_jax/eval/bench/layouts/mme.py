"""MME in its release layout: one folder per subtask, two yes/no questions per image.

    DATA/                       MME_Benchmark_release_version (or a folder holding it; an inner
      artwork/                  MME_Benchmark/ level is found too)
        images/10002.jpg        five subtasks (artwork, celebrity, landmark, posters, scene) keep their
        questions_answers_YN/   images and question files apart;
          10002.txt
      count/
        000000006040.jpg        the others keep them side by side
        000000006040.txt
      ...

A question file holds two lines `question<TAB>Yes|No` about the image of the same name (.jpg or .png). The
subtasks run are those of MME's perception and cognition lists that are present, in that order; other
folders are ignored. Each question is asked with LLaVA's short-answer suffix (`SHORT_ANSWER`), as in
LLaVA's `llava_mme.jsonl`. An item's id is "<subtask>/<image name>/<0 or 1>".
"""

from __future__ import annotations

import os

from owl_jax.eval.bench.mme import COGNITION, PERCEPTION, QUESTIONS_PER_IMAGE, evaluate_mme
from owl_jax.eval.bench.table import markdown_table
from owl_jax.eval.bench.tasks import SHORT_ANSWER, Item, Task

SUBTASKS = PERCEPTION + COGNITION
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
QA_DIR, IMAGES_DIR = "questions_answers_YN", "images"


def find_root(data_dir: str) -> str:
    """The folder whose subfolders are MME's subtasks."""
    for sub in ("", "MME_Benchmark_release_version", "MME_Benchmark", "MME_Benchmark_release_version/MME_Benchmark"):
        folder = os.path.normpath(os.path.join(data_dir, sub))
        if any(os.path.isdir(os.path.join(folder, t)) for t in SUBTASKS):
            return folder
    raise FileNotFoundError(f"{data_dir} has no MME subtask folders ({', '.join(SUBTASKS[:3])}, ...)")


def load(data_dir: str) -> Task:
    """Every question of the subtasks present, subtask by subtask, images in name order."""
    root = find_root(data_dir)
    items, truth = [], {}
    for subtask in SUBTASKS:
        folder = os.path.join(root, subtask)
        if not os.path.isdir(folder):
            continue
        split = os.path.isdir(os.path.join(folder, QA_DIR)) and os.path.isdir(os.path.join(folder, IMAGES_DIR))
        qa_dir, image_dir = (os.path.join(folder, QA_DIR), os.path.join(folder, IMAGES_DIR)) if split else (folder,) * 2
        images = {os.path.splitext(n)[0]: n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS)}
        names = sorted(n for n in os.listdir(qa_dir) if n.endswith(".txt"))
        if not names:
            raise FileNotFoundError(f"{qa_dir} holds no question files (<image name>.txt)")
        for name in names:
            path = os.path.join(qa_dir, name)
            stem = os.path.splitext(name)[0]
            if stem not in images:
                raise FileNotFoundError(f"{path}: no image {stem}.jpg or {stem}.png in {image_dir}")
            image, file = f"{subtask}/{images[stem]}", os.path.join(image_dir, images[stem])
            for i, (question, answer) in enumerate(read_questions(path)):
                qid = f"{image}/{i}"
                items.append(Item(qid, qid, f"{question}\n{SHORT_ANSWER}", file, image))
                truth[qid] = {"category": subtask, "image": image, "answer": answer}
    return Task("mme", items, truth, evaluate_mme, table, [root])


def read_questions(path: str) -> list[tuple[str, str]]:
    """The `(question, "Yes" | "No")` lines of one question file; ValueError naming file:line."""
    with open(path, encoding="utf-8-sig") as f:
        lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(f, 1) if line.strip()]
    out = []
    for n, line in lines:
        question, tab, answer = line.rpartition("\t")
        if not tab or answer.strip() not in ("Yes", "No"):
            raise ValueError(f"{path}:{n}: expected 'question<TAB>Yes' or 'question<TAB>No'")
        out.append((question.strip(), answer.strip()))
    if len(out) != QUESTIONS_PER_IMAGE:
        raise ValueError(f"{path}: {len(out)} questions, expected {QUESTIONS_PER_IMAGE}")
    return out


def table(results: dict) -> str:
    """acc, acc+ (percent) and score per subtask, then the perception and cognition totals."""
    rows = {t: {"acc": r["acc"], "acc+": r["acc_plus"], "score": r["score"]} for t, r in results["subtasks"].items()}
    rows["perception (of 2000)"] = {"score": results["perception"]}
    rows["cognition (of 800)"] = {"score": results["cognition"]}
    return markdown_table(rows, first_header="MME", digits=2)
