"""The markdown table shared by the benchmark metrics."""

import pytest

from owl_jax.eval.bench import evaluate_pope, markdown_table


def test_markdown_table_layout():
    rows = {"random": {"accuracy": 0.5, "f1": None}, "popular": {"accuracy": 0.25, "n": 4}}
    assert markdown_table(rows, first_header="split", digits=1, scale=100) == (
        "| split | accuracy | f1 | n |\n|---|---:|---:|---:|\n| random | 50.0 | - | - |\n| popular | 25.0 | - | 4 |"
    )


def test_markdown_table_picks_columns_and_escapes_bars():
    table = markdown_table({"a|b": {"x": 1.23456, "y": "p|q"}}, columns=["y", "x"])
    assert table.splitlines() == ["|  | y | x |", "|---|---:|---:|", "| a\\|b | p\\|q | 1.23 |"]


def test_markdown_table_from_results():
    gt = {1: {"label": "yes", "category": "random"}, 2: {"label": "no", "category": "random"}}
    out = evaluate_pope({1: "Yes", 2: "Yes"}, gt)
    table = markdown_table(out["splits"], columns=["accuracy", "yes_ratio"], scale=100, digits=1)
    assert table.splitlines()[-1] == "| random | 50.0 | 100.0 |"


def test_markdown_table_needs_columns():
    with pytest.raises(ValueError, match="no columns"):
        markdown_table({"a": {}})
