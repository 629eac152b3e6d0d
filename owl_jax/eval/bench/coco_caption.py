"""COCO caption metrics as the COCO caption evaluation computes them, through `pycocoevalcap` itself.

Every caption, predicted or human, goes through the evaluation's PTB tokenizer (Stanford CoreNLP: lower
case, punctuation dropped), then BLEU-1..4 (corpus BLEU, "closest" reference length), METEOR 1.5, ROUGE-L
and CIDEr-D (pycocoevalcap's `Cider`: n-grams up to 4, document frequencies over the evaluated images,
clipped counts and the Gaussian length penalty, times 10) score the tokenized captions. SPICE is left out
(it downloads Stanford models on first use). The tokenizer and METEOR are Java programs shipped inside
the package, so `java` must be on the PATH; METEOR's start (loading its paraphrase table) takes seconds.

Inputs:
- `predictions`: `{image_id: caption}` (or a dict with a `"text"` string);
- `ground_truth`: `{image_id: [human caption, ...]}` (Karpathy's test split has 5 per image).

Scores are pycocoevalcap's, in 0..1 (CIDEr-D in 0..10); papers print them times 100.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from typing import Any

from owl_jax.eval.bench.inputs import prediction_text

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
SCORERS = ("BLEU", "METEOR", "ROUGE-L", "CIDEr")  # what `scorers` may pick; BLEU gives BLEU-1..4


def check_requirements(scorers: Iterable[str] = SCORERS) -> None:
    """RuntimeError with one line saying what is missing: the `pycocoevalcap` package, or Java."""
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer  # noqa: F401
    except ImportError:
        raise RuntimeError("COCO caption metrics need the pycocoevalcap package (pip install pycocoevalcap)") from None
    if shutil.which("java") is None:
        needs = "the PTB tokenizer and METEOR" if "METEOR" in scorers else "the PTB tokenizer"
        raise RuntimeError(f"COCO caption metrics need Java for {needs}: no 'java' on the PATH")


def tokenize(captions: Mapping[Any, list[str]]) -> dict[Any, list[str]]:
    """The PTB tokenizer on `{key: [caption, ...]}`, in one Java run (keys may be any hashable values)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    if [len(tokenized.get(k, ())) for k in captions] != [len(v) for v in captions.values()]:
        raise RuntimeError("the PTB tokenizer returned a different number of captions than it was given")
    return tokenized


def evaluate_coco_captions(
    predictions: Mapping[Any, Any],
    ground_truth: Mapping[Any, list[str]],
    scorers: Iterable[str] = SCORERS,
    meteor: Any = None,
) -> dict:
    """COCO caption scores of `predictions` against `ground_truth` (see the module docstring).

    Args:
      scorers: which of `SCORERS` to run (all by default).
      meteor: a `pycocoevalcap.meteor.meteor.Meteor` to reuse (its Java process takes seconds to start).

    Returns:
      `{"BLEU-1": .., "BLEU-2": .., "BLEU-3": .., "BLEU-4": .., "METEOR": .., "ROUGE-L": .., "CIDEr": ..,
      "n": images}` with the metrics of the scorers run.
    """
    scorers = tuple(scorers)
    unknown = [s for s in scorers if s not in SCORERS]
    if unknown:
        raise ValueError(f"unknown caption scorers {unknown}; expected some of {SCORERS}")
    if not ground_truth:
        raise ValueError("ground_truth is empty")
    for image_id, refs in ground_truth.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"image_id {image_id!r}: ground truth must be a non-empty list of captions")
    check_requirements(scorers)
    texts = {("res", k): [prediction_text(predictions, k)] for k in ground_truth}
    texts.update({("gts", k): list(v) for k, v in ground_truth.items()})
    tokenized = tokenize(texts)
    gts = {k: tokenized[("gts", k)] for k in ground_truth}
    res = {k: tokenized[("res", k)] for k in ground_truth}
    return {**score_tokenized(gts, res, scorers, meteor), "n": len(gts)}


def score_tokenized(
    gts: Mapping[Any, list[str]], res: Mapping[Any, list[str]], scorers: Iterable[str] = SCORERS, meteor: Any = None
) -> dict[str, float]:
    """pycocoevalcap's scorers on tokenized captions (`{image_id: [caption]}` each, one predicted per image)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, float] = {}
    scorers = tuple(scorers)
    if "BLEU" in scorers:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if "METEOR" in scorers:
        if meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    if "ROUGE-L" in scorers:
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in scorers:
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out
