"""ScienceQA: LLaVA's letter extraction and the accuracy over image questions."""

import pytest

from owl_jax.eval.bench import evaluate_scienceqa, extract_letter
from owl_jax.eval.bench.scienceqa import FAILED


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B. The magnet attracts", "B"),
        ("The answer is C.", "C"),
        ("The answer is E, because", "E"),  # the character after the letter may be anything
        ("The answer is C", FAILED),  # the pattern needs one character after the letter
        ("The answer is A. The answer is B.", FAILED),  # more than one match
        (" B", FAILED),
        ("b", FAILED),
        ("B.The magnet", FAILED),  # a period without the space
    ],
)
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_img_accuracy():
    gt = {
        "1": {"answer": 1, "choices": ["a", "b", "c"], "image": "image.png"},
        "2": {"answer": 0, "choices": ["a", "b", "c"], "image": "image.png"},
        "3": {"answer": 2, "choices": ["a", "b", "c"], "image": None},
        "4": {"answer": 0, "choices": ["a", "b"], "image": "image.png"},
    }
    # "2" names D, beyond its three choices: wrong, though not failed; "4" has no prediction: failed.
    preds = {"1": "B", "2": "The answer is D.", "3": {"text": "C. sand"}}
    out = evaluate_scienceqa(preds, gt)
    assert out["per_question"] == {"1": True, "2": False, "3": True, "4": False}
    assert out["img_accuracy"] == pytest.approx(100 / 3)
    assert out["img_n"] == 3
    assert out["accuracy"] == 50.0
    assert out["n"] == 4
    assert out["failed"] == 1


def test_no_image_questions():
    out = evaluate_scienceqa({"1": "A"}, {"1": {"answer": 0, "choices": ["a", "b"]}})
    assert out["img_accuracy"] is None and out["accuracy"] == 100.0


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="question_id '1': answer must be a choice index below 2"):
        evaluate_scienceqa({"1": "A"}, {"1": {"answer": 2, "choices": ["a", "b"]}})
    with pytest.raises(KeyError, match="question_id '1' ground truth: no 'choices'"):
        evaluate_scienceqa({"1": "A"}, {"1": {"answer": 0}})
