"""MME: the official yes/no parsing, acc+ over an image's two questions, scores and totals."""

import pytest

from owl_jax.eval.bench import evaluate_mme, parse_mme_answer
from owl_jax.eval.bench.mme import COGNITION, PERCEPTION


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("not sure", "no"),  # "no" within the first 4 characters
        ("No idea", "no"),
        ("eyes", "yes"),  # "yes" within the first 4 characters
        ("The answer is yes", "other"),
        ("Maybe", "other"),
        ("", "other"),
    ],
)
def test_parse_mme_answer(text, expected):
    assert parse_mme_answer(text) == expected


def _q(category, image, answer):
    return {"category": category, "image": image, "answer": answer}


def test_acc_plus_and_totals():
    gt = {
        1: _q("existence", "a.jpg", "Yes"),
        2: _q("existence", "a.jpg", "No"),
        3: _q("existence", "b.jpg", "Yes"),
        4: _q("existence", "b.jpg", "No"),
        5: _q("count", "c.jpg", "Yes"),
        6: _q("count", "c.jpg", "No"),
        7: _q("commonsense_reasoning", "d.jpg", "Yes"),
        8: _q("commonsense_reasoning", "d.jpg", "No"),
    }
    preds = {1: "Yes", 2: "No", 3: "Yes", 4: "Yes", 5: "Maybe", 6: {"text": "No."}, 7: "yes", 8: "not sure"}
    out = evaluate_mme(preds, gt)
    ex = out["subtasks"]["existence"]  # 3 of 4 questions right; image b has one wrong, so 1 of 2 images
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert (ex["questions"], ex["images"], ex["other"]) == (4, 2, 0)
    co = out["subtasks"]["count"]  # "Maybe" is neither yes nor no: wrong
    assert (co["acc"], co["acc_plus"], co["score"], co["other"]) == (50.0, 0.0, 50.0, 1)
    assert out["subtasks"]["commonsense_reasoning"]["score"] == 200.0
    assert out["perception"] == 175.0
    assert out["cognition"] == 200.0
    assert out["missing"]["perception"] == [t for t in PERCEPTION if t not in ("existence", "count")]
    assert out["missing"]["cognition"] == list(COGNITION[1:])


def test_official_subtask_lists():
    assert len(PERCEPTION) == 10 and "OCR" in PERCEPTION and "artwork" in PERCEPTION
    assert COGNITION == ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="category 'color' image 'x.jpg': 1 questions, expected 2"):
        evaluate_mme({1: "yes"}, {1: _q("color", "x.jpg", "Yes")})
    with pytest.raises(ValueError, match="question_id 1: answer must be 'Yes' or 'No'"):
        evaluate_mme({1: "yes"}, {1: _q("color", "x.jpg", "Maybe")})
    with pytest.raises(KeyError, match="question_id 1 ground truth: no 'image'"):
        evaluate_mme({1: "yes"}, {1: {"category": "color", "answer": "Yes"}})
