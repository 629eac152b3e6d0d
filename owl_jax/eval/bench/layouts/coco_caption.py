"""COCO captions: the Karpathy test split (5,000 val2014 images, 5 human captions each), or all of val2014.

The first of these annotation files found in DATA is used::

    DATA/
      coco_karpathy_test.json   the split as BLIP and LAVIS ship it: [{"image": "val2014/COCO_val2014_...jpg",
                                "caption": [5 captions]}, ...]
      dataset_coco.json         Karpathy's own file: {"images": [{"filepath": "val2014", "filename",
                                "cocoid", "split": "test" | ..., "sentences": [{"raw": caption}, ...]}]};
                                its "test" images are used
      captions_val2014.json     COCO's official annotations (also under annotations/): {"images": [{"id",
                                "file_name"}], "annotations": [{"image_id", "caption"}]}; every image
      val2014/COCO_val2014_000000391895.jpg

Image ids are COCO's (`cocoid`, or the number in the file name). Each image is asked `CAPTION`.
"""

from __future__ import annotations

import os
import re

from owl_jax.eval.bench.coco_caption import SCORERS, check_requirements, evaluate_coco_captions
from owl_jax.eval.bench.layouts.files import field, find_dir, read_json
from owl_jax.eval.bench.table import markdown_table
from owl_jax.eval.bench.tasks import CAPTION, Item, Task

KARPATHY_TEST = "coco_karpathy_test.json"
KARPATHY_DATASET = "dataset_coco.json"
COCO_CAPTIONS = ("captions_val2014.json", "annotations/captions_val2014.json")
_IMAGE_ID = re.compile(r"(\d+)\.\w+$")


def load(data_dir: str, scorers: tuple[str, ...] = SCORERS) -> Task:
    """The captions of the first annotation file found (module docstring); `scorers` picks the metrics."""
    check_requirements(scorers)
    for name, read in (
        (KARPATHY_TEST, _karpathy_test),
        (KARPATHY_DATASET, _karpathy_dataset),
        *((name, _coco_annotations) for name in COCO_CAPTIONS),
    ):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            images = read(path, data_dir)
            break
    else:
        names = ", ".join((KARPATHY_TEST, KARPATHY_DATASET, *COCO_CAPTIONS))
        raise FileNotFoundError(f"{data_dir} has no COCO caption annotations (looked for {names})")
    items = [Item(str(i), i, CAPTION, image, i) for i, (image, _) in images.items()]
    truth = {i: refs for i, (_, refs) in images.items()}

    def score(answers, ground_truth):
        return evaluate_coco_captions(answers, ground_truth, scorers)

    return Task("coco_caption", items, truth, score, table, [path])


def _image_id(name: str, where: str) -> int:
    m = _IMAGE_ID.search(name)
    if m is None:
        raise ValueError(f"{where}: no image id in the file name {name!r}")
    return int(m.group(1))


def _captions(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{where}: expected a non-empty list of captions")
    return value


def _karpathy_test(path: str, data_dir: str) -> dict[int, tuple[str, list[str]]]:
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image', 'caption'}} objects")
    out = {}
    for i, row in enumerate(rows):
        where = f"{path}: [{i}]"
        image = field(row, "image", str, where)
        captions = row.get("caption") if isinstance(row, dict) else None
        captions = [captions] if isinstance(captions, str) else _captions(captions, f"{where} 'caption'")
        out[_image_id(image, where)] = (os.path.join(data_dir, image), captions)
    return out


def _karpathy_dataset(path: str, data_dir: str) -> dict[int, tuple[str, list[str]]]:
    out = {}
    for i, row in enumerate(field(read_json(path), "images", list, path)):
        where = f"{path}: images[{i}]"
        if field(row, "split", str, where) != "test":
            continue
        name = field(row, "filename", str, where)
        image = os.path.join(data_dir, field(row, "filepath", str, where), name)
        sentences = field(row, "sentences", list, where)
        refs = [field(s, "raw", str, f"{where} sentences[{j}]") for j, s in enumerate(sentences)]
        image_id = field(row, "cocoid", int, where) if "cocoid" in row else _image_id(name, where)
        out[image_id] = (image, _captions(refs, f"{where} sentences"))
    if not out:
        raise ValueError(f"{path}: no image has split 'test'")
    return out


def _coco_annotations(path: str, data_dir: str) -> dict[int, tuple[str, list[str]]]:
    data = read_json(path)
    folder = find_dir(data_dir, ("val2014", "images"), "image")
    files = {}
    for i, row in enumerate(field(data, "images", list, path)):
        where = f"{path}: images[{i}]"
        files[field(row, "id", int, where)] = os.path.join(folder, field(row, "file_name", str, where))
    refs: dict[int, list[str]] = {}
    for i, row in enumerate(field(data, "annotations", list, path)):
        where = f"{path}: annotations[{i}]"
        image_id = field(row, "image_id", int, where)
        if image_id not in files:
            raise ValueError(f"{where}: image_id {image_id} is not among the file's images")
        refs.setdefault(image_id, []).append(field(row, "caption", str, where))
    return {i: (files[i], refs[i]) for i in files if i in refs}


def table(results: dict) -> str:
    """The scores of the metrics run, times 100 as papers print them."""
    row = {m: results[m] for m in ("BLEU-4", "METEOR", "CIDEr", "ROUGE-L") if m in results}
    return markdown_table({"COCO captions (x100)": {**row, "images": results["n"]}}, scale=100.0, digits=1)
