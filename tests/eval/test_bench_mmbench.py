"""MMBench: choice extraction from free text, option rotation, and circular scoring per category."""

import pytest

from owl_jax.eval.bench import evaluate_mmbench, extract_choice
from owl_jax.eval.bench.mmbench import rotate_options

OPTIONS = {"A": "cat", "B": "dog", "C": "red fox", "D": "fox"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        (" (C) red fox", "C"),
        ("C: the animal on the left", "C"),
        ("The answer is D", "D"),  # a lone letter anywhere
        ("Answer: [B]", "B"),
        ("A dog", "B"),  # "A" before a lower-case word is the article; the option text decides
        ("It is a red fox", "C"),  # "fox" lies inside "red fox": the longer match wins
        ("I think it is a cat.", "A"),
        ("Either B or C", None),  # two letters
        ("A cat or a dog", None),  # two option texts
        ("I don't know", None),
        ("E", None),  # not one of the options
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS) == expected


def test_rotate_options():
    opts = {"A": "cat", "B": "dog", "C": "fox"}
    assert rotate_options(opts, 0) == opts
    assert rotate_options(opts, 1) == {"A": "dog", "B": "fox", "C": "cat"}
    assert rotate_options(opts, 2) == {"A": "fox", "B": "cat", "C": "dog"}


def test_circular_scoring():
    opts = {"A": "cat", "B": "dog", "C": "fox"}
    gt = {
        1: {"options": opts, "answer": "B", "category": "animals"},  # dog: B, then A, then C
        2: {"options": opts, "answer": "B", "category": "animals"},
        3: {"options": opts, "answer": "A", "category": "other"},  # cat: A, then C, then B
        4: {"options": opts, "answer": "A", "category": "other"},
    }
    preds = {
        1: ["B", "A", "C"],  # every rotation right
        2: ["B", "A", "A"],  # the last rotation wrong: the question is wrong
        3: ["cat", "The answer is C", {"text": "B. cat"}],  # by text, lone letter, leading letter
        4: ["I am not sure", "B", "C"],  # unparseable, then wrong twice
    }
    out = evaluate_mmbench(preds, gt)
    assert out["per_question"] == {1: True, 2: False, 3: True, 4: False}
    assert out["circular"] == 50.0
    assert out["single_pass"] == 75.0
    assert out["unparsed"] == 1
    assert out["n"] == 4
    assert out["per_category"] == {
        "animals": {"circular": 50.0, "single_pass": 100.0, "n": 2},
        "other": {"circular": 50.0, "single_pass": 50.0, "n": 2},
    }


def test_errors_name_the_field():
    gt = {5: {"options": {"A": "x", "B": "y"}, "answer": "A", "category": "c"}}
    with pytest.raises(ValueError, match="question_id 5: 1 answers, expected one per option"):
        evaluate_mmbench({5: ["A"]}, gt)
    with pytest.raises(TypeError, match="question_id 5: prediction must be a list"):
        evaluate_mmbench({5: "A"}, gt)
    with pytest.raises(ValueError, match="question_id 6: answer 'C' is not one of the options"):
        evaluate_mmbench({6: ["A", "B"]}, {6: {"options": {"A": "x", "B": "y"}, "answer": "C", "category": "c"}})
    with pytest.raises(ValueError, match="question_id 7: options must be lettered"):
        evaluate_mmbench({7: ["A", "B"]}, {7: {"options": {"A": "x", "C": "y"}, "answer": "A", "category": "c"}})
