"""OwlEval answering: the runner on a tiny generated OwlEval folder (`owleval_dir`, tests/eval/conftest.py)."""

import json
import shutil
import subprocess
import sys

import pytest

import owl_jax
from helpers import FIXTURE, QUESTIONS, make_owleval
from owl_jax.cli.eval import main
from owl_jax.data.prompts import build_prompt
from owl_jax.eval.owleval import Question, answer_owleval, conversations, load_questions
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.session import ChatSession

FIELDS = ["image", "question_id", "question", "answer", "model_id"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    shutil.copy(FIXTURE / "tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def owl(checkpoint):
    model, processor = owl_jax.from_pretrained(checkpoint, show_progress=False)
    return model, processor, Generator(model)


CFG = GenerationConfig(max_new_tokens=8)


@pytest.fixture(scope="module")
def answers(owl, owleval_dir):
    model, processor, gen = owl
    return answer_owleval(
        model, processor, owleval_dir, config=CFG, model_id="tiny", generator=gen, show_progress=False
    )


# ------------------------------------------------------------------------------------------------ runner


def test_grouping(owleval_dir):
    groups = conversations(load_questions(owleval_dir))
    assert [[q.question_id for q in g] for g in groups] == [[1], [2, 3, 4], [5], [6, 7]]
    odd = load_questions(owleval_dir) + [Question(9, "2.png", "q", ("a",), ("single_turn", "multi_turn"))]
    with pytest.warns(UserWarning, match="not the first turn"):
        conversations(odd)


def test_bad_questions_name_file_and_line(tmp_path):
    folder = make_owleval(tmp_path / "o", QUESTIONS[:2])
    with open(folder / "questions.jsonl", "a") as f:
        f.write(
            '{"image": "1.png", "question_id": 3, "question": "q", "ability": "a,z", "category": ["single_turn"]}\n'
        )
    with pytest.raises(ValueError, match=r"questions.jsonl:3: ability"):
        load_questions(folder)
    (folder / "questions.jsonl").write_text('{"image": "1.png"\n')
    with pytest.raises(ValueError, match=r"questions.jsonl:1: not valid JSON"):
        load_questions(folder)
    make_owleval(tmp_path / "p", QUESTIONS[:2])
    (tmp_path / "p" / "cases" / "2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2.png \(.*questions.jsonl:2\)"):
        load_questions(tmp_path / "p", check_images=True)


def test_runner_format_order_and_count(answers):
    assert [r["question_id"] for r in answers] == [q[0] for q in QUESTIONS]
    for row, (_, image, question, _, _) in zip(answers, QUESTIONS):
        assert list(row) == FIELDS
        assert (row["image"], row["question"], row["model_id"]) == (image, question, "tiny")
        assert isinstance(row["answer"], str)
    assert len({r["answer"] for r in answers}) > 3  # the questions really got different prompts


def test_multi_turn_answers_equal_a_fresh_conversation(owl, owleval_dir, answers):
    model, processor, gen = owl
    by_id = {r["question_id"]: r["answer"] for r in answers}
    session = ChatSession(gen, processor, max_length=2048, config=CFG)
    cases = owleval_dir / "cases"
    assert session.ask(QUESTIONS[1][2], [str(cases / "2.png")]) == by_id[2]
    assert session.ask(QUESTIONS[2][2]) == by_id[3]
    assert session.ask(QUESTIONS[3][2]) == by_id[4]
    session.reset()
    assert [session.ask(QUESTIONS[5][2], [str(cases / "4.jpg")]), session.ask(QUESTIONS[6][2])] == [by_id[6], by_id[7]]
    # The first turn of a conversation is the question asked alone, as the single-turn runs ask it.
    for qid, image in ((2, "2.png"), (6, "4.jpg"), (1, "1.png")):
        inputs = processor([build_prompt(QUESTIONS[qid - 1][2], num_images=1)], images=[str(cases / image)])
        out = gen.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], CFG)
        assert processor.decode([t for t in out.tokens[0] if t != CFG.eos_token_id]).strip() == by_id[qid]


def test_limit_and_skip(owl, owleval_dir, answers):
    model, processor, gen = owl
    run = lambda **kw: answer_owleval(
        model, processor, owleval_dir, config=CFG, model_id="tiny", generator=gen, show_progress=False, **kw
    )
    assert run(limit=3) == answers[:3]  # a conversation cut short keeps its first turns' answers
    # A conversation with a turn missing is answered again in full; complete ones are skipped.
    assert [r["question_id"] for r in run(skip={1, 2, 3, 5, 6, 7})] == [2, 3, 4]
    written = []
    assert run(skip={1, 2, 3, 4}, on_answer=written.append) == answers[4:]
    assert [[r["question_id"] for r in rows] for rows in written] == [[5], [6, 7]]


def test_sampling_seeded_per_question_and_long_conversations(owl, owleval_dir):
    model, processor, gen = owl
    run = lambda config, **kw: answer_owleval(
        model, processor, owleval_dir, config=config, generator=gen, show_progress=False, **kw
    )
    sampled = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=5, seed=3)
    full = run(sampled)
    assert run(sampled, skip={1, 2, 3, 4, 6, 7}) == [full[4]]  # an answer does not depend on what else ran
    # A conversation that outgrows the cache gets shorter answers, then empty ones, instead of an error.
    with pytest.warns(UserWarning, match="positions left|already fills"):
        rows = run(GenerationConfig(max_new_tokens=40), max_length=128)
    assert [r["question_id"] for r in rows] == [q[0] for q in QUESTIONS]


def test_runner_cli_resume(owl, owleval_dir, checkpoint, tmp_path, capsys):
    model, processor, gen = owl
    expected = answer_owleval(
        model,
        processor,
        owleval_dir,
        config=GenerationConfig(max_new_tokens=4),
        model_id="tiny",
        generator=gen,
        show_progress=False,
    )
    out = tmp_path / "answers.jsonl"
    kept = {"image": "1.png", "question_id": 1, "question": QUESTIONS[0][2], "answer": "kept", "model_id": "tiny"}
    stale = dict(kept, question_id=3, image="2.png", answer="stale")  # its conversation is incomplete: redone
    cut = json.dumps(dict(kept, question_id=5, image="3.png"))[:30]  # a run killed in the middle of a write
    out.write_text(json.dumps(stale) + "\n" + json.dumps(kept) + "\n" + cut)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "owl_jax.eval.owleval",
            "--checkpoint",
            str(checkpoint),
            "--owleval",
            str(owleval_dir),
            "--out",
            str(out),
            "--max-new-tokens",
            "4",
            "--model-id",
            "tiny",
            "--resume",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [kept] + expected[1:]
    assert "6 questions answered, 7 answers" in proc.stderr
    assert f"warning: {out}:3: " in proc.stderr and "cut" in proc.stderr
    # A damaged line before the end is a data error, reported before the model loads.
    out.write_text("{oops\n" + json.dumps(kept) + "\n")
    argv = ["answer", "--checkpoint", str(checkpoint), "--owleval", str(owleval_dir), "--out", str(out), "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}:1: not valid JSON") and err.count("\n") == 1
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "owl_jax.eval.owleval",
            "--checkpoint",
            str(checkpoint),
            "--owleval",
            str(tmp_path / "nowhere"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "questions.jsonl does not exist" in bad.stderr
