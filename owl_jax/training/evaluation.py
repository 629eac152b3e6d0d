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


def majority_baseline(examples: Sequence[Example]) -> dict[str, float]:
    """Per group: the fraction of examples whose answers equal the group's most frequent answers."""
    answers: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in examples:
        answers[e.source][tuple(a for _, a in e.turns)] += 1
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


def format_table(baseline: dict[str, float], results: dict[str, dict[str, float]]) -> str:
    """Rows per group: baseline and the accuracy after each stage (columns in `results` order)."""
    stages = list(results)
    header = f"{'question type':<14} {'majority':>9} " + " ".join(f"{s:>14}" for s in stages)
    lines = [header, "-" * len(header)]
    for group in baseline:
        cells = " ".join(f"{results[s].get(group, float('nan')):>14.1%}" for s in stages)
        lines.append(f"{group:<14} {baseline[group]:>9.1%} {cells}")
    return "\n".join(lines)
