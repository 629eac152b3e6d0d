"""Run a benchmark: answer its items in batches, keep every answer as it comes, then score and tabulate.

An output folder holds::

    run.json             the settings the predictions were made with (task, data, checkpoint, decoding)
    predictions.jsonl    one {"key", "question_id", ["round",] "prompt", "text"} a line, in item order
    results.json         the task's metrics (as its `evaluate_*` returns them, without per-question detail)
    results.md           the metrics as a markdown table

Answers are appended to `predictions.jsonl.partial` batch by batch, one flushed line each, and
`predictions.jsonl` is written once all are in (`owl_jax.eval.jsonl`). Running the same command again
resumes: the answers in either file are kept (a last line cut short by a kill is dropped with a warning)
and only the missing items are asked, or those whose stored prompt is not the one the task asks now; the
model is not even loaded when none are missing. A folder whose
`run.json` names other settings is refused rather than mixed, unless `overwrite` starts it afresh. Answers
to items outside this run (an earlier run without `--limit`) are kept in the file but not scored.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from owl_jax.eval.bench.tasks import Item, Task, gather_answers
from owl_jax.eval.jsonl import PartialWriter, partial_path, resume_rows, write_jsonl

PREDICTIONS = "predictions.jsonl"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SETTINGS = "run.json"


class Answerer(Protocol):
    """Answers up to `rows` items at once: their answer texts, in order (`answering.BatchAnswerer`)."""

    rows: int

    def __call__(self, items: Sequence[Item]) -> list[str]: ...


def check_settings(out_dir: str, settings: Mapping[str, Any], overwrite: bool = False) -> None:
    """Refuse an output folder made with other settings (ValueError naming `run.json` and the first
    setting that differs); with `overwrite`, delete its predictions instead. Then record `settings`."""
    path = os.path.join(out_dir, SETTINGS)
    predictions = os.path.join(out_dir, PREDICTIONS)
    if overwrite:
        for p in (predictions, partial_path(predictions)):
            if os.path.exists(p):
                os.remove(p)
    elif os.path.isfile(path):
        from owl_jax.eval.bench.layouts.files import read_json

        earlier = read_json(path)
        for key, value in settings.items():
            if not isinstance(earlier, dict) or earlier.get(key) != value:
                had = earlier.get(key) if isinstance(earlier, dict) else None
                raise ValueError(
                    f"{path}: this folder holds predictions made with {key}={had!r}, not {value!r}; "
                    "pass --overwrite to start it afresh, or another --out"
                )
    os.makedirs(out_dir, exist_ok=True)
    _write_json(path, dict(settings))


def earlier_answers(out_dir: str) -> dict[str, dict]:
    """The prediction rows an earlier run left in `out_dir` (complete or partial file), by item key."""
    rows = resume_rows(os.path.join(out_dir, PREDICTIONS))
    return {r["key"]: r for r in rows if isinstance(r.get("key"), str) and isinstance(r.get("text"), str)}


def prediction_row(item: Item, text: str) -> dict:
    row = {"key": item.key, "question_id": item.question_id}
    if item.round is not None:
        row["round"] = item.round
    return {**row, "prompt": item.question, "text": text}


def answer_items(
    task: Task,
    out_dir: str,
    make_answerer: Callable[[], Answerer],
    *,
    show_progress: bool = True,
) -> tuple[dict[str, dict], int]:
    """Answer the items of `task` missing from `out_dir` a batch at a time, saving each batch as it ends.

    `make_answerer` is called only if some item is missing. Returns the rows of every answer now in the
    folder, by key, and how many items were asked now.
    """
    from tqdm.auto import tqdm

    done = earlier_answers(out_dir)
    todo = [item for item in task.items if done.get(item.key, {}).get("prompt") != item.question]
    path = os.path.join(out_dir, PREDICTIONS)
    writer = PartialWriter(path, carried=done.values())
    try:
        if todo:
            answer = make_answerer()
            with tqdm(
                total=len(task.items),
                initial=len(task.items) - len(todo),
                desc=task.name,
                unit="ans",
                file=sys.stderr,
                disable=not show_progress,
                dynamic_ncols=True,
            ) as bar:
                for start in range(0, len(todo), answer.rows):
                    batch = todo[start : start + answer.rows]
                    rows = [prediction_row(item, text) for item, text in zip(batch, answer(batch), strict=True)]
                    writer.append(rows)
                    done.update((r["key"], r) for r in rows)
                    bar.update(len(batch))
        ordered = [done[item.key] for item in task.items]
        keys = {item.key for item in task.items}
        write_jsonl(path, ordered + [r for k, r in done.items() if k not in keys])
        writer.finish()
    finally:
        writer.close()
    return done, len(todo)


def score(task: Task, rows: Mapping[str, dict]) -> dict | None:
    """The task's metrics from the prediction rows, without per-question detail (None without ground truth)."""
    if task.score is None:
        return None
    answers = gather_answers(task.items, {k: r["text"] for k, r in rows.items()})
    metrics = task.score(answers, task.ground_truth)
    return {k: v for k, v in metrics.items() if k != "per_question"}


def run_task(
    task: Task,
    out_dir: str,
    make_answerer: Callable[[], Answerer],
    settings: Mapping[str, Any],
    *,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Answer, score and write everything of the module docstring into `out_dir`; returns results.json's object.

    Args:
      task: from `load_task` (possibly `limited`).
      make_answerer: builds the `Answerer` (called only when some item has no answer yet).
      settings: what the predictions depend on, recorded in `run.json` and checked on resume.
    """
    check_settings(out_dir, settings, overwrite)
    rows, asked = answer_items(task, out_dir, make_answerer, show_progress=show_progress)
    results = {
        "task": task.name,
        "files": task.files,
        "settings": dict(settings),
        "items": len(task.items),
        "questions": len({item.question_id for item in task.items}),
        "asked_now": asked,
        "metrics": score(task, rows),
    }
    if task.submission is not None:
        name, content = task.submission(gather_answers(task.items, {k: r["text"] for k, r in rows.items()}))
        _write_json(os.path.join(out_dir, name), content)
        results["submission"] = name
    _write_json(os.path.join(out_dir, RESULTS_JSON), results)
    with open(os.path.join(out_dir, RESULTS_MD), "w", encoding="utf-8") as f:
        f.write(markdown_report(task, results) + "\n")
    return results


def markdown_report(task: Task, results: dict) -> str:
    """results.md: the task's table (or a note on the submission file) and the settings it was made with."""
    if results["metrics"] is None:
        body = f"No ground truth in these files: submit `{results.get('submission')}` to the evaluation server."
    else:
        body = task.table(results["metrics"])
    settings = ", ".join(f"{k}={v}" for k, v in results["settings"].items())
    return f"## {task.name}\n\n{body}\n\n{results['items']} answers; {settings}"


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
