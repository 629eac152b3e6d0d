"""POPE: LLaVA's yes/no parsing and the metrics of small confusion matrices, per split."""

import pytest

from owl_jax.eval.bench import evaluate_pope, parse_yes_no


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is none.", "no"),
        ("There is no dog in the image.", "no"),
        ("I do not think so", "no"),
        ("no.", "no"),
        ("Yes. But not in the corner", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # only "No", "no" and "not" are negations
        ("Not really", "yes"),
        ("none", "yes"),
        ("", "yes"),
        ("No,there is nothing", "yes"),  # commas are deleted, not spaced: "Nothere" is no negation
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_metrics_per_split():
    gt = {
        # popular first: the splits still come out random, popular, adversarial
        10: {"label": "yes", "category": "popular"},
        11: {"label": "no", "category": "popular"},
        1: {"label": "yes", "category": "random"},
        2: {"label": "yes", "category": "random"},
        3: {"label": "yes", "category": "random"},
        4: {"label": "no", "category": "random"},
        5: {"label": "no", "category": "random"},
    }
    preds = {1: "Yes", 2: "Yes, it is.", 3: "No", 4: {"text": "yes"}, 5: "There is no such object.", 10: "no", 11: "No"}
    out = evaluate_pope(preds, gt)
    assert list(out["splits"]) == ["random", "popular"]
    r = out["splits"]["random"]  # TP 2, FN 1, FP 1, TN 1
    assert (r["tp"], r["fp"], r["tn"], r["fn"], r["n"]) == (2, 1, 1, 1, 5)
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["yes_ratio"] == pytest.approx(0.6)
    p = out["splits"]["popular"]  # TP 0, FN 1, FP 0, TN 1: precision has no denominator
    assert (p["tp"], p["fp"], p["tn"], p["fn"]) == (0, 0, 1, 1)
    assert (p["accuracy"], p["precision"], p["recall"], p["f1"], p["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0, 0.0)
    assert out["mean"]["accuracy"] == pytest.approx(0.55)
    assert out["mean"]["f1"] == pytest.approx(1 / 3)


def test_f1_differs_from_accuracy():
    # labels yes, yes, no, no; answers yes, yes, yes, yes: TP 2, FP 2 -> P 0.5, R 1, F1 2/3, accuracy 0.5
    gt = {i: {"label": lab, "category": "adversarial"} for i, lab in enumerate(["yes", "yes", "no", "no"])}
    out = evaluate_pope(dict.fromkeys(range(4), "Yes"), gt)["splits"]["adversarial"]
    assert (out["precision"], out["recall"], out["accuracy"], out["yes_ratio"]) == (0.5, 1.0, 0.5, 1.0)
    assert out["f1"] == pytest.approx(2 / 3)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="question_id 1: label must be 'yes' or 'no'"):
        evaluate_pope({1: "yes"}, {1: {"label": "maybe", "category": "random"}})
    with pytest.raises(KeyError, match="question_id 1 ground truth: no 'category'"):
        evaluate_pope({1: "yes"}, {1: {"label": "yes"}})
    with pytest.raises(KeyError, match="question_id 2: no prediction"):
        evaluate_pope({}, {2: {"label": "yes", "category": "random"}})
