"""MMBench: the dev split's TSV file, images inside it as base64, asked with every rotation of the options.

    DATA/
      mmbench_dev_20230712.tsv   columns index, question, hint, A, B, C, D, answer, category, image
                                 (base64 JPEG/PNG), and others that are not read; the first file named
                                 mmbench_dev*.tsv in DATA is used

A question's options are the option columns from A up to the first empty one (at least two). It is asked
once per option, the option texts rotated one place further each time (`mmbench.rotate_options`), as
LLaVA's `model_vqa_mmbench.py --all-rounds` asks it, and in LLaVA's words: the hint (when there is one) on
the line before the question, then a line `X. option` per option, then `OPTION_LETTER`. Circular accuracy
counts a question right only if every rotation is answered right (`owl_jax.eval.bench.mmbench`). The test
split has no answers; it is scored by MMBench's server, not here.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import glob
import io
import os
import string
import sys

from PIL import Image

from owl_jax.eval.bench.mmbench import evaluate_mmbench, rotate_options
from owl_jax.eval.bench.table import markdown_table
from owl_jax.eval.bench.tasks import OPTION_LETTER, Item, Task

REQUIRED = ("index", "question", "A", "B", "answer", "category", "image")
_MISSING = ("", "nan", "none")  # how pandas writes an empty cell, and LLaVA's is_none spellings


def find_file(data_dir: str) -> str:
    found = sorted(glob.glob(os.path.join(glob.escape(data_dir), "mmbench_dev*.tsv")))
    if not found:
        raise FileNotFoundError(f"{data_dir} has no MMBench dev file (mmbench_dev*.tsv, e.g. mmbench_dev_20230712.tsv)")
    return found[0]


def load(data_dir: str) -> Task:
    """Every question of the dev file, one item per rotation of its options."""
    path = find_file(data_dir)
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default limit
    items, truth = [], {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (the test split has no 'answer': use the dev split)")
        for n, row in enumerate(reader, 2):
            where = f"{path}:{n}"
            try:
                qid = int(row["index"])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: 'index' must be an integer, got {row['index']!r}") from None
            options = {}
            for letter in string.ascii_uppercase:
                if _missing(row.get(letter)):
                    break
                options[letter] = row[letter]
            if len(options) < 2 or row["answer"] not in options:
                raise ValueError(f"{where}: needs options A, B, ... and an answer among them, got {list(options)}")
            if qid in truth:
                raise ValueError(f"{where}: index {qid} repeats")
            hint = None if _missing(row.get("hint")) else row["hint"]
            image = functools.partial(decode_image, row["image"], where)
            for r in range(len(options)):
                question = prompt(row["question"], hint, rotate_options(options, r))
                items.append(Item(f"{qid}/{r}", qid, question, image, qid, r))
            truth[qid] = {"options": options, "answer": row["answer"], "category": row["category"]}
    return Task("mmbench", items, truth, evaluate_mmbench, table, [path])


def prompt(question: str, hint: str | None, options: dict[str, str]) -> str:
    """The question as LLaVA asks it: hint line, question, one `X. option` line per option, instruction."""
    lines = ([hint] if hint is not None else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
    return "\n".join(lines + [OPTION_LETTER])


def decode_image(data: str, where: str) -> Image.Image:
    """The image stored as base64 in a cell of the TSV file."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        image.load()
    except (binascii.Error, OSError, ValueError) as e:
        raise ValueError(f"{where}: 'image' is not a base64 image ({e})") from None
    return image.convert("RGB")


def _missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in _MISSING


def table(results: dict) -> str:
    """Circular and single-pass accuracy, overall and per category, in percent."""
    rows = {"overall": {"circular": results["circular"], "single_pass": results["single_pass"], "n": results["n"]}}
    rows.update(results["per_category"])
    return markdown_table(rows, first_header="MMBench (%)", digits=1)
