"""COCO captions: our wrapper gives pycocoevalcap's own numbers, and BLEU matches a hand computation."""

import math
import shutil

import pytest

from owl_jax.eval.bench import evaluate_coco_captions
from owl_jax.eval.bench.coco_caption import check_requirements

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason="the COCO caption metrics run Java (PTB tokenizer, METEOR); no java on PATH"
)

GROUND_TRUTH = {
    11: ["A red circle on the left.", "a red ball on the left side", "A small red round shape."],
    12: ["Two blue squares next to each other.", "two blue boxes", "Blue squares, two of them."],
    13: ["A green triangle in the middle.", "a green triangle", "The triangle is green."],
    14: ["A yellow square on the right.", "yellow box, right side"],
}
# One empty answer and one with a line break: each still lines up with its image through the tokenizer.
PREDICTIONS = {11: "A red circle, on the left!", 12: "", 13: {"text": "a green\ntriangle"}, 14: "a yellow square"}


def _official(predictions, ground_truth, meteor=None):
    """What pycocoevalcap's COCOEvalCap.evaluate does: tokenize references and results apart, then score."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    text = lambda p: p["text"] if isinstance(p, dict) else p  # noqa: E731
    gts = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in ground_truth.items()})
    res = PTBTokenizer().tokenize({k: [{"caption": text(predictions[k])}] for k in ground_truth})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    out["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor is not None:
        out["METEOR"] = meteor.compute_score(gts, res)[0]
    return out


@needs_java
def test_equals_pycocoevalcap_without_meteor():
    ours = evaluate_coco_captions(PREDICTIONS, GROUND_TRUTH, scorers=("BLEU", "ROUGE-L", "CIDEr"))
    official = _official(PREDICTIONS, GROUND_TRUTH)
    assert ours == pytest.approx({**official, "n": 4}, rel=1e-12)
    assert 0 < ours["CIDEr"] and 0 < ours["BLEU-4"] < ours["BLEU-1"] < 1


@needs_java
def test_bleu_by_hand():
    # Tokenized: "the cat sat on the mat" against "the cat sat on a mat": clipped n-gram matches 5/6, 3/5,
    # 2/4 and 1/3, equal lengths (no brevity penalty). pycocoevalcap adds 1e-9 to each denominator.
    gt = {1: ["The cat sat on a mat."]}
    out = evaluate_coco_captions({1: "The cat sat on the mat"}, gt, scorers=("BLEU",))
    precisions = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    for n in range(1, 5):
        assert out[f"BLEU-{n}"] == pytest.approx(math.prod(precisions[:n]) ** (1 / n), rel=1e-6)
    # Shorter than the reference: every n-gram matches, the brevity penalty is exp(1 - 6/4).
    short = evaluate_coco_captions({1: "the cat sat on"}, gt, scorers=("BLEU",))
    assert short["BLEU-4"] == pytest.approx(math.exp(1 - 6 / 4), rel=1e-6)


@needs_java
@pytest.mark.slow  # METEOR's Java start loads a 60 MB paraphrase table: 10-30 s on a 2-core machine
def test_meteor_equals_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()  # one Java start (seconds: it loads METEOR's paraphrase table) for both scorings
    ours = evaluate_coco_captions(PREDICTIONS, GROUND_TRUTH, meteor=meteor)
    official = _official(PREDICTIONS, GROUND_TRUTH, meteor)
    assert ours == pytest.approx({**official, "n": 4}, rel=1e-12)
    assert 0 < ours["METEOR"] < 1


def test_missing_java_is_one_line(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"^COCO caption metrics need Java for the PTB tokenizer and METEOR: no"):
        check_requirements()
    with pytest.raises(ValueError, match=r"image_id 3: ground truth must be a non-empty list"):
        evaluate_coco_captions({3: "x"}, {3: "a caption, not a list"})
