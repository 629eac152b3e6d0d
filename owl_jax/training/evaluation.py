"""Held-out evaluation: teacher-forced answer accuracy per group, beside the majority-answer baseline.

An example counts as correct when the model's argmax predicts every one of its answer tokens (and each
answer's EOS) given the true prefix. Examples are grouped by `Example.source` (the question type of a
held-out set, or the released task type).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from owl_jax.data.records import Example


def majority_baseline(examples: Sequence[Example], *, last_only: bool = False) -> dict[str, float]:
    """Per group: the fraction of examples whose answers (or last answers) equal the group's most frequent."""
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in examples:
        answers[e.source][e.turns[-1][1] if last_only else tuple(a for _, a in e.turns)] += 1
    return {g: c.most_common(1)[0][1] / sum(c.values()) for g, c in sorted(answers.items())}


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n, i = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0] // n
    return {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}


def evaluate(
    trainer: Any, params: Any, batches: Sequence[dict[str, np.ndarray]], examples: Sequence[Example]
) -> dict[str, Any]:
    """Accuracy per group and overall, and the mean answer-token loss, on every held-out example."""
    correct, loss_sum, tokens = [], 0.0, 0.0
    for batch in batches:
        out = trainer.eval_step(params, trainer.global_batch(_local_rows(batch)))
        rows = multihost_utils.process_allgather(out["row_correct"], tiled=True)
        correct.append(np.asarray(rows))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    hits = np.concatenate(correct)[: len(examples)]
    groups: dict[str, list[bool]] = collections.defaultdict(list)
    for example, hit in zip(examples, hits):
        groups[example.source].append(bool(hit))
    accuracy = {g: float(np.mean(v)) for g, v in sorted(groups.items())}
    return {
        "accuracy": accuracy,
        "overall": float(np.mean(hits)) if len(hits) else 0.0,
        "count": {g: len(v) for g, v in groups.items()},
        "loss": loss_sum / max(tokens, 1.0),
    }


def bar(majority: float) -> float:
    """What a question type should reach: two thirds of the way from the majority answer to 100%."""
    return majority + (1.0 - majority) * 2.0 / 3.0


def format_table(baseline: dict[str, float], results: dict[str, dict[str, float]], *, with_bar: bool = False) -> str:
    """Rows per group: baseline (and `bar`) and the accuracy in each column of `results` (in order)."""
    columns = list(results)
    width = max([14, *(len(c) + 1 for c in columns)])
    header = f"{'question type':<14} {'majority':>9} " + ("     bar " if with_bar else "")
    header += " ".join(f"{c:>{width}}" for c in columns)
    lines = [header, "-" * len(header)]
    for group in baseline:
        cells = " ".join(f"{results[c].get(group, float('nan')):>{width}.1%}" for c in columns)
        bar_cell = f"{bar(baseline[group]):>8.1%} " if with_bar else ""
        lines.append(f"{group:<14} {baseline[group]:>9.1%} {bar_cell}{cells}")
    return "\n".join(lines)
