"""ScienceQA-IMG: the test questions of ScienceQA that come with an image, in the dataset's release layout.

    DATA/
      problems.json          {pid: {"question", "choices": [...], "answer": index, "hint", "image":
                             "image.png" | null, ...}}
      pid_splits.json        {"train": [pid, ...], "val": [...], "test": [...], ...}
      images/test/<pid>/image.png

A question is asked as LLaVA-1.5 asks it (`llava_test_CQM-A.json` with `--single-pred-prompt`, which
lmms-eval's `scienceqa_img` rebuilds): "Context: <hint>" on a first line when there is a hint, the question,
one `X. choice` line per choice, then `OPTION_LETTER`.
"""

from __future__ import annotations

import os
import string

from owl_jax.eval.bench.layouts.files import field, find_file, read_json
from owl_jax.eval.bench.scienceqa import OPTIONS, evaluate_scienceqa
from owl_jax.eval.bench.table import markdown_table
from owl_jax.eval.bench.tasks import OPTION_LETTER, Item, Task

SPLIT = "test"


def load(data_dir: str) -> Task:
    """The test questions with an image, in the order of `pid_splits.json`."""
    problems_path = find_file(data_dir, ("problems.json", "data/scienceqa/problems.json"), "ScienceQA problems.json")
    root = os.path.dirname(problems_path)
    splits_path = os.path.join(root, "pid_splits.json")
    if not os.path.isfile(splits_path):
        raise FileNotFoundError(f"{splits_path} does not exist (ScienceQA's split lists, beside problems.json)")
    problems = read_json(problems_path)
    if not isinstance(problems, dict):
        raise ValueError(f"{problems_path}: expected a JSON object {{pid: problem}}")
    pids = field(read_json(splits_path), SPLIT, list, splits_path)
    items, truth = [], {}
    for pid in pids:
        where = f"{problems_path}: problem {pid!r}"
        if pid not in problems:
            raise ValueError(f"{splits_path}: {SPLIT} pid {pid!r} is not in {problems_path}")
        problem = problems[pid]
        image = field(problem, "image", (str, type(None)), where)
        if not image:
            continue
        choices = field(problem, "choices", list, where)
        answer = field(problem, "answer", int, where)
        if not 2 <= len(choices) <= len(OPTIONS) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: needs 2 to {len(OPTIONS)} choices and an answer index among them")
        question = prompt(field(problem, "question", str, where), problem.get("hint") or "", choices)
        path = os.path.join(root, "images", SPLIT, pid, image)
        items.append(Item(pid, pid, question, path, pid))
        truth[pid] = {"answer": answer, "choices": choices, "image": image}
    if not items:
        raise ValueError(f"{splits_path}: no {SPLIT} question has an image")
    return Task("scienceqa_img", items, truth, evaluate_scienceqa, table, [problems_path, splits_path])


def prompt(question: str, hint: str, choices: list[str]) -> str:
    """LLaVA-1.5's ScienceQA question (module docstring)."""
    lines = [f"Context: {hint}"] if hint else []
    lines += [question] + [f"{letter}. {c}" for letter, c in zip(string.ascii_uppercase, choices)]
    return "\n".join(lines + [OPTION_LETTER])


def table(results: dict) -> str:
    """Accuracy over the image questions, in percent."""
    row = {"IMG accuracy": results["img_accuracy"], "questions": results["img_n"], "no letter": results["failed"]}
    return markdown_table({"ScienceQA (%)": row}, digits=1)
