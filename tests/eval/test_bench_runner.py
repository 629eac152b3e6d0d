"""The benchmark runner on the tiny fixture model: every task's official layout in, predictions and scores out.

The fixture's weights are random, so its answers are noise; these tests check the plumbing: every item is
answered once, the scores are the task's metric applied to the stored answers, and a killed run resumes.
"""

import json
import subprocess
import sys

import jax
import pytest

import owl_jax
from bench_datasets import TASK_DATA, make_pope
from helpers import FIXTURE
from owl_jax.cli.eval import main as eval_main
from owl_jax.data.processor import OwlProcessor
from owl_jax.eval.bench import (
    evaluate_coco_captions,
    evaluate_mmbench,
    evaluate_mme,
    evaluate_pope,
    evaluate_scienceqa,
    evaluate_vqav2,
)
from owl_jax.eval.bench.answering import BatchAnswerer
from owl_jax.eval.bench.cli import main
from owl_jax.eval.bench.layouts import coco_caption
from owl_jax.eval.bench.runner import PREDICTIONS, RESULTS_JSON, RESULTS_MD, run_task
from owl_jax.eval.bench.tasks import load_task
from owl_jax.inference.generate import GenerationConfig, Generator

TOKENIZER = FIXTURE / "tokenizer.model"
NEW_TOKENS = 3
SETTINGS = {"checkpoint": "tiny", "max_new_tokens": NEW_TOKENS}
# Without METEOR, whose Java start takes seconds (tests/eval/test_bench_coco_caption.py covers it).
CAPTION_SCORERS = ("BLEU", "ROUGE-L", "CIDEr")
METRICS = {
    "vqav2": evaluate_vqav2,
    "coco_caption": lambda p, g: evaluate_coco_captions(p, g, CAPTION_SCORERS),
    "pope": evaluate_pope,
    "mme": evaluate_mme,
    "mmbench": evaluate_mmbench,
    "scienceqa_img": evaluate_scienceqa,
}


@pytest.fixture(scope="module")
def answerer():
    model, processor = owl_jax.from_pretrained(FIXTURE / "checkpoint", show_progress=False)
    cfg = model.config
    processor = OwlProcessor(TOKENIZER, image_size=cfg.vision.image_size, image_tokens=cfg.image_tokens)
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS,
        eos_token_id=processor.eos_token_id,
        bos_token_id=processor.bos_token_id,
        pad_token_id=processor.pad_token_id,
    )
    return BatchAnswerer(model, processor, config, rows=4, generator=Generator(model))


def _task(name, folder):
    if name == "coco_caption":
        return coco_caption.load(str(folder), scorers=CAPTION_SCORERS)
    return load_task(name, folder)


def _rows(out):
    return [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]


class Counting:
    """Wraps an answerer: counts the items asked, and raises KeyboardInterrupt at batch `stop_at` (a kill)."""

    def __init__(self, inner, stop_at=None):
        self.inner, self.rows, self.stop_at, self.asked, self.batches = inner, inner.rows, stop_at, [], 0

    def __call__(self, items):
        self.batches += 1
        if self.batches == self.stop_at:
            raise KeyboardInterrupt
        self.asked += [item.key for item in items]
        return self.inner(items)


@pytest.mark.parametrize("name", list(TASK_DATA))
def test_every_task_answered_and_scored(name, answerer, tmp_path):
    task = _task(name, TASK_DATA[name](tmp_path / "data"))
    out = tmp_path / "out"
    counting = Counting(answerer)
    results = run_task(task, str(out), lambda: counting, SETTINGS, show_progress=False)
    rows = _rows(out)
    assert [r["key"] for r in rows] == [item.key for item in task.items] == counting.asked
    assert all(isinstance(r["text"], str) for r in rows)
    assert [r["prompt"] for r in rows] == [item.question for item in task.items]
    # The stored scores are the task's metric applied to the stored answers.
    answers = {}
    for r in rows:
        if "round" in r:
            answers.setdefault(r["question_id"], []).append(r["text"])
        else:
            answers[r["question_id"]] = r["text"]
    expected = {k: v for k, v in METRICS[name](answers, task.ground_truth).items() if k != "per_question"}
    assert results["metrics"] == json.loads(json.dumps(expected))
    assert json.loads((out / RESULTS_JSON).read_text())["metrics"] == results["metrics"]
    assert results["items"] == len(task.items) and results["asked_now"] == len(task.items)
    assert (out / RESULTS_MD).read_text().startswith(f"## {name}\n\n|")
    assert not (out / (PREDICTIONS + ".partial")).exists()


def test_resume_after_kill(answerer, tmp_path):
    task = load_task("mme", TASK_DATA["mme"](tmp_path / "data"))  # 6 items: batches of 4 and 2
    full = tmp_path / "full"
    run_task(task, str(full), lambda: answerer, SETTINGS, show_progress=False)
    out = tmp_path / "out"
    killed = Counting(answerer, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_task(task, str(out), lambda: killed, SETTINGS, show_progress=False)
    partial = out / (PREDICTIONS + ".partial")
    saved = partial.read_text().splitlines()
    assert len(saved) == 4 and not (out / PREDICTIONS).exists()
    partial.write_text("\n".join(saved[:3]) + "\n" + saved[3][:25])  # killed in the middle of a line
    resumed = Counting(answerer)
    results = run_task(task, str(out), lambda: resumed, SETTINGS, show_progress=False)
    assert resumed.asked == [item.key for item in task.items[3:]]  # the cut line's item is asked again
    assert _rows(out) == _rows(full)  # no repeats, same answers, same order
    assert results["metrics"] == json.loads((full / RESULTS_JSON).read_text())["metrics"]
    assert results["asked_now"] == 3
    # Complete: a rerun asks nothing and does not build an answerer; the results are the same.
    again = run_task(task, str(out), lambda: pytest.fail("no answerer needed"), SETTINGS, show_progress=False)
    assert again["metrics"] == results["metrics"] and again["asked_now"] == 0
    # An answer stored for another prompt (the question's wording changed since) is asked again.
    rows = _rows(out)
    rows[1]["prompt"] = "an older wording"
    (out / PREDICTIONS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    reworded = Counting(answerer)
    run_task(task, str(out), lambda: reworded, SETTINGS, show_progress=False)
    assert reworded.asked == [task.items[1].key] and _rows(out) == _rows(full)


def test_other_settings_refused_unless_overwrite(answerer, tmp_path):
    task = load_task("pope", make_pope(tmp_path / "data")).limited(2)
    out = tmp_path / "out"
    run_task(task, str(out), lambda: answerer, SETTINGS, show_progress=False)
    other = {**SETTINGS, "max_new_tokens": 9}
    with pytest.raises(ValueError, match=r"run.json: .*max_new_tokens=3, not 9; pass --overwrite"):
        run_task(task, str(out), lambda: answerer, other, show_progress=False)
    counting = Counting(answerer)
    run_task(task, str(out), lambda: counting, other, overwrite=True, show_progress=False)
    assert counting.asked == ["random/1", "random/2"]
    assert json.loads((out / "run.json").read_text()) == other


def test_limit_keeps_whole_units(tmp_path):
    mme = load_task("mme", TASK_DATA["mme"](tmp_path / "mme")).limited(2)
    assert [i.key for i in mme.items] == [
        "count/000000006040.png/0",
        "count/000000006040.png/1",
        "artwork/10002.jpg/0",
        "artwork/10002.jpg/1",
    ]
    assert set(mme.ground_truth) == {i.question_id for i in mme.items}
    mmbench = load_task("mmbench", TASK_DATA["mmbench"](tmp_path / "mmb")).limited(1)
    assert [i.key for i in mmbench.items] == ["0/0", "0/1"] and list(mmbench.ground_truth) == [0]


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (fake) devices")
def test_cli_data_parallel_matches_one_device(answerer, tmp_path, capsys):
    data = make_pope(tmp_path / "data", per_split=3)
    one = tmp_path / "one"
    run_task(load_task("pope", data), str(one), lambda: answerer, SETTINGS, show_progress=False)
    out = tmp_path / "two"
    argv = ["--task", "pope", "--data", str(data), "--checkpoint", str(FIXTURE / "checkpoint")]
    argv += ["--tokenizer", str(TOKENIZER), "--out", str(out), "--max-new-tokens", str(NEW_TOKENS)]
    assert main([*argv, "--batch-size", "3", "--devices", "2", "--quiet"]) == 0  # batches of 4 over 2 devices
    assert [r["text"] for r in _rows(out)] == [r["text"] for r in _rows(one)]
    printed = capsys.readouterr()
    assert printed.out.startswith("## pope\n\n| POPE (%) | accuracy |") and "6 items answered now" in printed.err


def test_cli_errors_are_one_line(tmp_path, capsys):
    base = ["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    cases = [
        (["--task", "vqav2", "--data", str(tmp_path)], "has neither v2_OpenEnded_mscoco_val2014_questions.json"),
        (["--task", "mme", "--data", str(tmp_path / "nowhere")], "is not a folder"),
        (["--task", "pope", "--data", str(tmp_path), "--limit", "0"], "--limit must be at least 1"),
    ]
    data = make_pope(tmp_path / "pope")
    (data / "val2014" / "COCO_val2014_000000000101.jpg").unlink()
    cases.append((["--task", "pope", "--data", str(data)], "COCO_val2014_000000000101.jpg does not exist"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "problems.json").write_text('{"1": {"question": "q"')
    (bad / "pid_splits.json").write_text("{}")
    cases.append((["--task", "scienceqa_img", "--data", str(bad)], "problems.json: not valid JSON"))
    for argv, message in cases:
        assert main(base + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing was run
    # The module entry point and `owl-eval bench` are the same command.
    proc = subprocess.run(
        [sys.executable, "-m", "owl_jax.eval.bench", *base, "--task", "mmbench", "--data", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "mmbench_dev*.tsv" in proc.stderr
    assert eval_main(["bench", *base, "--task", "mmbench", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == proc.stderr
