"""OwlEval judging: grades, tables and retries against a fake OpenAI-compatible judge server (conftest.py)."""

import json
import subprocess
import sys

import pytest

from helpers import QUESTIONS
from owl_jax.eval import judge
from owl_jax.eval.owleval import load_questions


def grade(files, owleval_dir, url, model, **kw):
    return judge.grade_answers(
        files, owleval_dir, judge_url=url, judge_model=model, backoff=0.01, show_progress=False, **kw
    )


def test_parse_grade():
    for reply, expected in [
        ("Grade: B", "B"),
        ("B", "B"),
        ("**B**", "B"),
        ("(C).", "C"),
        ("**Grade:** D", "D"),
        ("Fine.\nfinal grade is A", "A"),
        ("A. Correct.", "A"),
        ("Grade: A\nNo, Grade: C", "C"),
        ("Looks fine.\n\n**A**", "A"),
        ("Rating - C", "C"),
        ("A cat sits here.", None),
        ("I cannot decide.", None),
        ("", None),
        (None, None),
        ("grade: a bit high", None),
    ]:
        assert judge.parse_grade(reply) == expected, reply


def test_well_behaved_judge_tables(fake_judge, owleval_dir, answer_files):
    server, url = fake_judge
    grades = grade(answer_files, owleval_dir, url, "good", concurrency=3)
    assert [(g["model_id"], g["question_id"]) for g in grades] == [(m, q[0]) for m in ("m1", "m2") for q in QUESTIONS]
    assert [g["grade"] for g in grades[:7]] == ["A", "B", "C", "D", "A", "A", "B"]
    assert {g["grade"] for g in grades[7:]} == {"D"} and all(g["error"] is None for g in grades)
    assert len(server.requests) == 14 and all(r["temperature"] == 0 for r in server.requests)
    # The image travels as a data URL; the third turn of a conversation sees the two before it.
    q4 = next(
        r
        for r in server.requests
        if "Spell the second word." in r["messages"][1]["content"][-1]["text"]
        and "ok " in r["messages"][1]["content"][-1]["text"]
    )
    assert q4["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    text = q4["messages"][1]["content"][-1]["text"]
    assert (
        text.index("Read the text")
        < text.index("ok FINE answer 2")
        < text.index("Why is it funny?")
        < text.index("ok MEH answer 3")
        < text.index("[Answer to grade]\nok BAD answer 4")
    )

    tables = judge.summarize(grades)
    m1 = tables["models"]["m1"]
    assert m1["category"]["single_turn"]["counts"] == {"A": 3, "B": 1, "C": 0, "D": 0, "?": 0}
    assert m1["category"]["multi_turn"]["counts"] == {"A": 1, "B": 2, "C": 1, "D": 1, "?": 0}
    assert m1["category"]["single_turn"]["percent"]["A"] == 75.0
    assert m1["category"]["multi_turn"]["percent"]["B"] == 40.0
    expected = {
        "a": (7, 500 / 7, 2.0),
        "b": (4, 75.0, 2.25),
        "c": (2, 50.0, 1.0),
        "d": (2, 100.0, 3.0),
        "e": (2, 50.0, 1.5),
        "f": (3, 100 / 3, 1.0),
    }
    for letter, (n, share, mean) in expected.items():
        s = m1["ability"][letter]
        assert (s["n"], s["graded"], s["unparseable"]) == (n, n, 0)
        assert s["a_or_b"] == pytest.approx(share) and s["mean_score"] == pytest.approx(mean)
    assert tables["models"]["m2"]["ability"]["d"]["mean_score"] == 0.0

    text = judge.format_tables(tables)
    assert "mPLUG-Owl 7B (paper, human)" in text
    assert "32 (64.0%)" in text and "13 (25.0%)" in text  # the paper's single-turn A and multi-turn C
    assert "3 (75.0%)" in text and "71% 2.00 n=7" in text


def test_garbage_judge_is_unparseable_after_one_retry(fake_judge, owleval_dir, answer_files):
    server, url = fake_judge
    grades = grade(answer_files[:1], owleval_dir, url, "garbage", sees_images=False)
    assert {g["grade"] for g in grades} == {"?"} and all(len(g["replies"]) == 2 for g in grades)
    assert "no grade" in grades[0]["error"]
    assert len(server.requests) == 14
    first = server.requests[0]["messages"]
    assert isinstance(first[1]["content"], str) and judge.TEXT_ONLY_NOTE.strip() in first[0]["content"]
    m1 = judge.summarize(grades)["models"]["m1"]
    assert m1["category"]["single_turn"]["counts"] == {"A": 0, "B": 0, "C": 0, "D": 0, "?": 4}
    assert m1["category"]["multi_turn"]["percent"]["?"] == 100.0
    assert m1["ability"]["a"] == {"n": 7, "graded": 0, "unparseable": 7, "a_or_b": None, "mean_score": None}
    assert "- n=7 ?7" in judge.format_tables(judge.summarize(grades))


def test_reask_flaky_and_failing_judges(fake_judge, owleval_dir, answer_files):
    server, url = fake_judge
    shy = grade(answer_files[:1], owleval_dir, url, "shy")
    assert {g["grade"] for g in shy} == {"B"} and shy[0]["replies"] == ["Hard to say.", "B"]
    assert server.requests[-1]["messages"][-1]["content"] == judge.REASK
    server.requests.clear()
    flaky = grade(answer_files[:1], owleval_dir, url, "flaky", concurrency=1)
    assert [g["grade"] for g in flaky] == ["A", "B", "C", "D", "A", "A", "B"]
    assert len(server.requests) == 8  # one 500, retried
    rejected = grade(answer_files[:1], owleval_dir, url, "reject", concurrency=1)
    assert {g["grade"] for g in rejected} == {"?"} and "HTTP 400" in rejected[0]["error"]
    assert "--no-judge-sees-images" in rejected[0]["error"]
    down = grade(answer_files[:1], owleval_dir, "http://127.0.0.1:9", "good", retries=1, timeout=2)
    assert {g["grade"] for g in down} == {"?"} and "2 attempts failed" in down[0]["error"]


def test_bad_answer_file_names_line(owleval_dir, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question_id": 1, "answer": "a"}\n{"question_id": 99, "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: question_id 99"):
        judge.load_answers([path], load_questions(owleval_dir))


def test_judge_cli(fake_judge, owleval_dir, answer_files, tmp_path):
    server, url = fake_judge
    out = tmp_path / "grades.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "owl_jax.eval.judge",
            "--answers",
            *map(str, answer_files),
            "--owleval",
            str(owleval_dir),
            "--judge-url",
            url,
            "--judge-model",
            "good",
            "--out",
            str(out),
            "--quiet",
            "--no-judge-sees-images",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 14 and rows[0]["grade"] == "A" and rows[0]["answers_file"] == "m1.jsonl"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("m1") and "3 (75.0%)" in line for line in lines)
    assert any(line.startswith("mPLUG-Owl 7B (paper, human)") and "32 (64.0%)" in line for line in lines)
    down = subprocess.run(
        [
            sys.executable,
            "-m",
            "owl_jax.eval.judge",
            "--answers",
            str(answer_files[0]),
            "--owleval",
            str(owleval_dir),
            "--judge-url",
            "http://127.0.0.1:9/v1",
            "--judge-model",
            "x",
            "--retries",
            "0",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 1 and "no grade for m1 question 1" in down.stderr
