"""Held-out answers the model writes itself: greedy decoding through the public inference path.

Teacher-forced accuracy (`owl_jax.training.evaluation`) shows the model every true answer token before
asking for the next, so a model can score there and still never produce the answer on its own. Here each
held-out question is asked as a user asks it: the stage's saved `model/` folder is loaded with
`owl_jax.from_pretrained`, the conversation (earlier turns with their true answers, the last one open) is
laid out by `build_prompt` and encoded by the folder's `OwlProcessor`, and the KV-cache `Generator` decodes
greedily. An answer counts when it equals the true one after VQAv2's answer normalisation
(`owl_jax.eval.bench.normalize`: case, punctuation, articles, number words).
"""

from __future__ import annotations

import collections
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from owl_jax.data.prompts import build_prompt
from owl_jax.data.records import Example
from owl_jax.eval.bench.normalize import normalize_answer


def prompt_of(example: Example) -> str:
    """The inference prompt of an example's last question: earlier turns answered, the last one open."""
    turns = [(q, a) for q, a in example.turns[:-1]] + [(example.turns[-1][0], None)]
    return build_prompt(turns, num_images=len(example.images))


def generated_answers(
    model_folder: str,
    examples: Sequence[Example],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    on_batch: Any = None,
) -> list[str]:
    """Greedy answers, one per example, from the converted model folder `model_folder`.

    Every batch has `batch_size` rows (the last one is filled with repeats), so the decode steps compile
    once. `on_batch(n)` is called with the number of examples answered so far.
    """
    import owl_jax
    from owl_jax.inference.generate import Generator
    from owl_jax.inference.sampling import GenerationConfig

    model, processor = owl_jax.from_pretrained(model_folder, show_progress=False)
    generator = Generator(model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=processor.eos_token_id,
        pad_token_id=processor.pad_token_id,
        bos_token_id=processor.bos_token_id,
    )
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        rows = chunk + [chunk[-1]] * (batch_size - len(chunk))
        images = [Image.open(io.BytesIO(b)) for e in rows for b in e.images]
        inputs = processor([prompt_of(e) for e in rows], images=images or None)
        out = generator.generate(
            inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], config, decode=processor.decode
        )
        answers += out.texts[: len(chunk)]
        if on_batch is not None:
            on_batch(len(answers))
    return answers


def answer_accuracy(examples: Sequence[Example], answers: Sequence[str]) -> dict[str, Any]:
    """Per group (`Example.source`) and overall: the fraction of generated answers equal to the true last
    answer after normalisation; also a few wrong answers per group, for reading."""
    if len(examples) != len(answers):
        raise ValueError(f"{len(examples)} examples but {len(answers)} answers")
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    wrong: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for example, answer in zip(examples, answers):
        truth = example.turns[-1][1]
        hit = normalize_answer(answer) == normalize_answer(truth)
        hits[example.source].append(hit)
        if not hit and len(wrong[example.source]) < 3:
            wrong[example.source].append((truth, answer))
    all_hits = [h for v in hits.values() for h in v]
    return {
        "accuracy": {g: float(np.mean(v)) for g, v in sorted(hits.items())},
        "overall": float(np.mean(all_hits)) if all_hits else 0.0,
        "count": {g: len(v) for g, v in sorted(hits.items())},
        "wrong_examples": dict(wrong),
    }
