"""VQAv2: the official answer normalisation on its edge cases, and the leave-one-out accuracy."""

import pytest

from owl_jax.eval.bench import evaluate_vqav2, normalize_answer, question_accuracy


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A dog.", "dog"),  # article and trailing period go
        ("The two cats", "2 cats"),  # number word to digit, article removed
        ("none", "0"),
        ("Zero", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only none/zero .. ten are mapped
        ("an apple", "apple"),
        ("1,000", "1000"),  # digit-comma-digit: the comma is deleted, not spaced
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.5.", "3.5"),
        ("yes...", "yes"),
        ("e.g.", "eg"),
        ("Yes!", "yes"),
        ("t-shirt", "t shirt"),  # a mark touching no space becomes a space
        ("well-known - yes", "wellknown yes"),  # the same mark touching a space somewhere: deleted everywhere
        ("1,000 dollars-ish", "1000 dollarsish"),  # a number with a comma: every mark deleted
        ("dont", "don't"),  # contractions restored
        ("Dont", "don't"),  # after lower-casing
        ("isnt it", "isn't it"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("couldntve", "couldntve"),  # not in the official table
        ("it's", "it's"),  # the apostrophe is not a punctuation mark there
        ("Im", "im"),  # the official "Im" entry never matches: words are lower-cased first
        ("two\tdogs\n", "2 dogs"),
        ("  the  red   car ", "red car"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "matching, expected",
    [
        (0, 0.0),
        (1, 0.3),  # 9 subsets with 1 match (1/3 each), 1 with none: 9/30
        (2, 0.6),  # 2 subsets with 1 match, 8 with 2: (2/3 + 16/3) / 10
        (3, 0.9),  # plain min(3/3, 1) would be 1: 3 subsets keep only 2 matches
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(matching, expected):
    humans = ["2"] * matching + ["3"] * (10 - matching)
    assert question_accuracy("two", humans) == pytest.approx(expected)


def test_human_answers_punctuated_only_when_they_disagree():
    # Disagreeing humans: "t-shirt" becomes "t shirt", which the normalised prediction matches (4 humans).
    assert question_accuracy("T-shirt", ["t-shirt"] * 4 + ["shirt"] * 6) == pytest.approx(1.0)
    # Unanimous humans are compared as stored, so "t-shirt" never equals a normalised prediction.
    assert question_accuracy("T-shirt", ["t-shirt"] * 10) == 0.0


def test_evaluate_overall_and_per_answer_type():
    gt = {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
        2: {"answers": [{"answer": "2", "answer_id": i} for i in range(3)] + ["3"] * 7, "answer_type": "number"},
        3: {"answers": ["dog"] * 10, "answer_type": "other", "question_type": "what is"},
    }
    preds = {1: "Yes", 2: {"answer": "two"}, 3: "cat", 99: "ignored"}
    out = evaluate_vqav2(preds, gt)
    assert out["overall"] == pytest.approx(100 * 1.9 / 3)
    assert out["per_answer_type"] == pytest.approx({"yes/no": 100.0, "number": 90.0, "other": 0.0})
    assert out["per_question_type"] == pytest.approx({"is the": 100.0, "what is": 0.0})
    assert out["n"] == 3
    assert out["per_question"] == pytest.approx({1: 1.0, 2: 0.9, 3: 0.0})


def test_errors_name_the_question():
    gt = {7: {"answers": ["yes"] * 10, "answer_type": "yes/no"}}
    with pytest.raises(KeyError, match="question_id 7: no prediction"):
        evaluate_vqav2({}, gt)
    with pytest.raises(KeyError, match="question_id 8 ground truth: no 'answer_type'"):
        evaluate_vqav2({8: "yes"}, {8: {"answers": ["yes"]}})
    with pytest.raises(TypeError, match="question_id 7 prediction"):
        evaluate_vqav2({7: 3}, gt)
