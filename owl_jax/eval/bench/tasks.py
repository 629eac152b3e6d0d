"""A benchmark as the runner sees it: the questions to ask (`Item`), their ground truth and how to score them.

Each loader in `owl_jax.eval.bench.layouts` reads one benchmark's official files into a `Task`; `load_task`
picks the loader by name. An item is one generation: one image, one question in the mPLUG-Owl template.
MMBench asks each question once per rotation of its options, so several items share a question id and
differ in `round`; everything else asks each question once.

Prompts: mPLUG-Owl published no prompts for these benchmarks, so the questions carry LLaVA-1.5's evaluation
suffixes (`SHORT_ANSWER`, `OPTION_LETTER`, as in LLaVA's `llava/eval` question files and scripts) and, for
COCO captions, `CAPTION`, the one-sentence caption instruction that lmms-eval's `coco_cap` tasks ask LLaVA
models. The whole question then goes into the released template (`owl_jax.data.prompts.build_prompt`).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
CAPTION = "Provide a one-sentence caption for the provided image."

# --task name -> module of owl_jax.eval.bench.layouts holding its `load(data_dir) -> Task`
TASKS = {
    "vqav2": "vqav2",
    "coco_caption": "coco_caption",
    "pope": "pope",
    "mme": "mme",
    "mmbench": "mmbench",
    "scienceqa_img": "scienceqa",
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One generation.

    Attributes:
      key: unique among the task's items; predictions are stored and resumed by it.
      question_id: the benchmark's id of the question (the key of the ground truth).
      question: the text asked, suffix included, before it goes into the mPLUG-Owl template.
      image: a file path, or a function returning the image (images stored inside the data file).
      unit: what `--limit` counts and keeps whole (MME: an image's two questions; MMBench: all rotations).
      round: MMBench's rotation of the options; None where a question is asked once.
    """

    key: str
    question_id: Any
    question: str
    image: str | Callable[[], Image.Image]
    unit: Any
    round: int | None = None


@dataclasses.dataclass
class Task:
    """A benchmark's items and how to score answers to them.

    Attributes:
      name: the `--task` name.
      items: in the order they are asked.
      ground_truth: `{question_id: ...}` in the form the task's metric takes.
      score: `(answers, ground_truth) -> results`, where `answers` maps every question id to its answer text
        (MMBench: the list of answers per rotation); None when the files hold no ground truth (test splits).
      table: results -> a markdown table of the numbers reported.
      files: the files the task was read from, for the results file.
      submission: `(answers) -> (file name, JSON object)` for a test split scored by an evaluation server.
    """

    name: str
    items: list[Item]
    ground_truth: dict
    score: Callable[[Mapping[Any, Any], Mapping[Any, Any]], dict] | None
    table: Callable[[dict], str]
    files: list[str]
    submission: Callable[[Mapping[Any, Any]], tuple[str, Any]] | None = None

    def limited(self, limit: int | None) -> Task:
        """The task restricted to its first `limit` units (None: all), ground truth included."""
        if limit is None:
            return self
        units: dict[Any, None] = {}
        for item in self.items:
            if item.unit not in units and len(units) == limit:
                break
            units.setdefault(item.unit)
        items = [item for item in self.items if item.unit in units]
        kept = {item.question_id for item in items}
        truth = {qid: gt for qid, gt in self.ground_truth.items() if qid in kept}
        return dataclasses.replace(self, items=items, ground_truth=truth)

    def missing_images(self) -> list[str]:
        """The image files the items name that do not exist (each once, in item order)."""
        paths = dict.fromkeys(item.image for item in self.items if isinstance(item.image, str))
        return [p for p in paths if not os.path.isfile(p)]


def gather_answers(items: Sequence[Item], texts: Mapping[str, str]) -> dict:
    """`{question_id: answer}` from the answer text of every item key; a list by round where items have rounds."""
    answers: dict[Any, Any] = {}
    for item in items:
        text = texts[item.key]
        if item.round is None:
            answers[item.question_id] = text
        else:
            rounds = answers.setdefault(item.question_id, [])
            rounds += [None] * (item.round + 1 - len(rounds))
            rounds[item.round] = text
    return answers


def load_task(name: str, data_dir: str | os.PathLike) -> Task:
    """The task `name` (one of `TASKS`) read from its official files under `data_dir`.

    Raises FileNotFoundError or ValueError with one line naming the file (and field) that is missing or wrong.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir} is not a folder")
    module = importlib.import_module(f"owl_jax.eval.bench.layouts.{TASKS[name]}")
    return module.load(data_dir)
