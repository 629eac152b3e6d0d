"""Judging when things go wrong: odd judge replies, Ctrl-C, and `--resume` (fake judge: conftest.py)."""

import json
import signal
import subprocess
import sys
import time

from helpers import QUESTIONS
from owl_jax.cli.eval import main

# Runs `owl-eval` with Python's Ctrl-C handling even where the test runner was started with SIGINT ignored.
CLI = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from owl_jax.cli.eval import main; sys.exit(main(sys.argv[1:]))"
)


def judge_args(answer_files, owleval_dir, url, model, *extra):
    files = [str(p) for p in answer_files]
    return ["judge", "--answers", *files, "--owleval", str(owleval_dir), "--judge-url", url, "--judge-model", model,
            "--quiet", "--no-judge-sees-images", "--backoff", "0.01", *extra]  # fmt: skip


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reply_content_that_is_not_text_is_a_failed_grade(fake_judge, owleval_dir, answer_files, tmp_path, capsys):
    server, url = fake_judge
    out = tmp_path / "grades.jsonl"
    assert main(judge_args(answer_files[:1], owleval_dir, url, "odd", "--retries", "1", "--out", str(out))) == 0
    rows = read_rows(out)
    assert [r["grade"] for r in rows] == ["A", "B", "?", "?", "A", "A", "B"]
    assert "choices[0].message.content" in rows[2]["error"] and "int" in rows[2]["error"]
    assert "dict" in rows[3]["error"]
    assert len(server.requests) == 5 + 2 * 2  # the two odd replies were retried once
    err = capsys.readouterr().err
    assert "no grade for m1 question 3: " in err and "no grade for m1 question 4: " in err


def test_ctrl_c_keeps_the_grades_and_resume_finishes(fake_judge, owleval_dir, answer_files, tmp_path, capsys):
    server, url = fake_judge
    out, partial = tmp_path / "grades.jsonl", tmp_path / "grades.jsonl.partial"
    args = judge_args(answer_files, owleval_dir, url, "slow", "--concurrency", "1", "--out", str(out))
    pipe = subprocess.PIPE
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=pipe, stderr=pipe, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.read_text().count("\n") >= 2):  # two grades in; the third hangs
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - start < 5  # it does not wait for the request in flight
    assert proc.returncode == 130, err
    assert err == f"interrupted: 2 grades saved in {partial}; run the same command with --resume to finish\n"
    assert len(read_rows(partial)) == 2 and not out.exists()

    server.release.set()
    assert main([*args, "--resume"]) == 0
    rows = read_rows(out)
    assert [(r["model_id"], r["question_id"]) for r in rows] == [(m, q[0]) for m in ("m1", "m2") for q in QUESTIONS]
    assert len(server.requests) == 3 + 12 and not partial.exists()  # the two saved grades were not asked again
    # The tables count every grade of the file, the two from before the interruption included.
    assert any(line.startswith("m1") and "3 (75.0%)" in line for line in capsys.readouterr().out.splitlines())


def test_resume_grades_what_is_missing_failed_or_cut(fake_judge, owleval_dir, answer_files, tmp_path, capsys):
    server, url = fake_judge
    out, partial = tmp_path / "grades.jsonl", tmp_path / "grades.jsonl.partial"
    args = judge_args(answer_files, owleval_dir, url, "good", "--out", str(out))
    assert main(args) == 0
    full = out.read_text().splitlines()
    assert len(full) == 14 and not partial.exists()

    # What a killed run leaves: a failed grade, and a last line cut in the middle of its write.
    out.unlink()
    failed = json.dumps(dict(json.loads(full[1]), grade="?", error="HTTP 500"))
    partial.write_text("\n".join([full[0], failed, *full[2:5], full[5][:40]]))
    server.requests.clear()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert out.read_text().splitlines() == full and not partial.exists()
    assert len(server.requests) == 14 - 4
    err = capsys.readouterr().err
    assert f"warning: {partial}:6: " in err and "cut" in err

    # An answer that changed since it was graded is graded again; another judge's grades are not reused.
    answers = answer_files[0].read_text().splitlines()
    answers[0] = json.dumps(dict(json.loads(answers[0]), answer="ok BAD answer 1"))
    answer_files[0].write_text("\n".join(answers) + "\n")
    server.requests.clear()
    assert main([*args, "--resume"]) == 0
    assert len(server.requests) == 1 and read_rows(out)[0]["grade"] == "D"
    server.requests.clear()
    assert main([*args, "--judge-model", "other", "--resume"]) == 0
    assert len(server.requests) == 14

    # A damaged line inside the file is a data error naming it, and nothing is asked.
    partial.write_text("not json\n" + full[0] + "\n")
    capsys.readouterr()
    server.requests.clear()
    assert main([*args, "--resume"]) == 2 and not server.requests
    err = capsys.readouterr().err
    assert err.startswith(f"error: {partial}:1: ") and err.count("\n") == 1
    assert main(judge_args(answer_files, owleval_dir, url, "good", "--resume")) == 2
    assert "--resume needs --out" in capsys.readouterr().err
