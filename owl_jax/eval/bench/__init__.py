"""Metrics of the standard multimodal benchmarks, applied as their official scripts apply them.

Pure Python, no model: each `evaluate_*` takes predictions and ground truth as plain dicts keyed by
question id and returns a dict of results (formats in each module's docstring); `markdown_table` prints any
`{row: {column: value}}` part of them.

- `vqav2`: VQA accuracy with the official answer normalisation (`normalize`), per answer type;
- `pope`: accuracy, precision, recall, F1 and yes-ratio per split, LLaVA's yes/no parsing;
- `mme`: acc, acc+ and score per subtask, perception and cognition totals;
- `mmbench`: circular accuracy per category, with choice extraction from free text;
- `scienceqa`: accuracy over image questions, LLaVA's answer extraction;
- `coco_caption`: BLEU, METEOR, ROUGE-L and CIDEr-D through `pycocoevalcap` (needs Java).

Running a checkpoint on a benchmark's files: `python -m owl_jax.eval.bench` (`cli`), which reads the official
layouts (`layouts`), answers in batches (`answering`, `runner`) and scores with the functions above;
`synthetic_vqav2.export_vqav2` writes the demo's held-out questions in VQAv2's layout.
"""

from owl_jax.eval.bench.coco_caption import evaluate_coco_captions
from owl_jax.eval.bench.mmbench import evaluate_mmbench, extract_choice
from owl_jax.eval.bench.mme import evaluate_mme, parse_mme_answer
from owl_jax.eval.bench.normalize import normalize_answer
from owl_jax.eval.bench.pope import evaluate_pope, parse_yes_no
from owl_jax.eval.bench.scienceqa import evaluate_scienceqa, extract_letter
from owl_jax.eval.bench.table import markdown_table
from owl_jax.eval.bench.vqav2 import evaluate_vqav2, question_accuracy

__all__ = [
    "evaluate_coco_captions",
    "evaluate_mmbench",
    "evaluate_mme",
    "evaluate_pope",
    "evaluate_scienceqa",
    "evaluate_vqav2",
    "extract_choice",
    "extract_letter",
    "markdown_table",
    "normalize_answer",
    "parse_mme_answer",
    "parse_yes_no",
    "question_accuracy",
]
