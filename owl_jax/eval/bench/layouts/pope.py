"""POPE on COCO: the question files of the POPE repository (`output/coco/`) and the val2014 images.

    DATA/
      coco_pope_random.json       one {"question_id", "image": "COCO_val2014_...jpg", "text": question,
      coco_pope_popular.json      "label": "yes" | "no"} a line (JSON lines despite the extension);
      coco_pope_adversarial.json  the splits present are run (also found under coco/, LLaVA's layout)
      val2014/COCO_val2014_000000310196.jpg

Question ids restart in every split, so an item's id is "<split>/<question_id>". Each question is asked
with LLaVA's short-answer suffix (`SHORT_ANSWER`), as in LLaVA's `llava_pope_test.jsonl`.
"""

from __future__ import annotations

import os

from owl_jax.eval.bench.layouts.files import field, find_dir, read_json_lines
from owl_jax.eval.bench.pope import METRICS, SPLITS, evaluate_pope
from owl_jax.eval.bench.table import markdown_table
from owl_jax.eval.bench.tasks import SHORT_ANSWER, Item, Task


def split_file(split: str) -> str:
    return f"coco_pope_{split}.json"


def load(data_dir: str) -> Task:
    """The questions of every split file in `data_dir` (or its coco/ folder), in the order of `SPLITS`."""
    folder = next(
        (d for d in (data_dir, os.path.join(data_dir, "coco")) if any(_has(d, s) for s in SPLITS)),
        None,
    )
    if folder is None:
        names = ", ".join(split_file(s) for s in SPLITS)
        raise FileNotFoundError(f"{data_dir} has none of the POPE question files {names} (nor coco/ with them)")
    images = find_dir(data_dir, ("val2014", "images", os.path.join("coco", "val2014")), "image")
    items, truth, files = [], {}, []
    for split in SPLITS:
        if not _has(folder, split):
            continue
        path = os.path.join(folder, split_file(split))
        files.append(path)
        for where, row in read_json_lines(path):
            key = f"{split}/{field(row, 'question_id', (int, str), where)}"
            label = field(row, "label", str, where)
            if label.strip().lower() not in ("yes", "no"):
                raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}")
            if key in truth:
                raise ValueError(f"{where}: question_id repeats within {split}")
            image = os.path.join(images, field(row, "image", str, where))
            items.append(Item(key, key, f"{field(row, 'text', str, where)}\n{SHORT_ANSWER}", image, key))
            truth[key] = {"label": label, "category": split}
    return Task("pope", items, truth, evaluate_pope, table, files)


def _has(folder: str, split: str) -> bool:
    return os.path.isfile(os.path.join(folder, split_file(split)))


def table(results: dict) -> str:
    """Accuracy, precision, recall, F1 and yes-ratio per split and their mean, in percent."""
    rows = {split: {m: r[m] for m in METRICS} for split, r in results["splits"].items()}
    rows["mean"] = dict(results["mean"])
    return markdown_table(rows, columns=list(METRICS), first_header="POPE (%)", scale=100.0, digits=1)
