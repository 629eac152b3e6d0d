"""OwlEval: the answer runner on a tiny generated OwlEval folder, and the judge against a fake OpenAI server."""

import http.server
import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import owl_jax
from helpers import FIXTURE
from owl_jax.data.prompts import build_prompt
from owl_jax.eval import judge
from owl_jax.eval.owleval import Question, answer_owleval, conversations, load_questions
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.session import ChatSession

# (question_id, image, question, ability, category): one conversation of three turns on 2.png, one of two on
# 4.jpg, and two questions asked alone; abilities a-f all appear.
QUESTIONS = [
    (1, "1.png", "What is drawn here?", "a,b", ["single_turn"]),
    (2, "2.png", "Read the text in the picture.", "a,c", ["single_turn", "multi_turn"]),
    (3, "2.png", "Why is it funny?", "a,b,e,f", ["multi_turn"]),
    (4, "2.png", "Spell the second word.", "a,c,f", ["multi_turn"]),
    (5, "3.png", "Who painted this?", "a,d", ["single_turn"]),
    (6, "4.jpg", "Which city is this?", "a,b,d", ["single_turn", "multi_turn"]),
    (7, "4.jpg", "Why do you think so?", "a,b,e,f", ["multi_turn"]),
]
FIELDS = ["image", "question_id", "question", "answer", "model_id"]


def make_owleval(folder, questions=QUESTIONS):
    """A tiny OwlEval folder: questions.jsonl and generated images in cases/."""
    rng = np.random.default_rng(0)
    (folder / "cases").mkdir(parents=True)
    for i, name in enumerate(sorted({q[1] for q in questions})):
        pixels = rng.integers(0, 256, (40 + 10 * i, 60 - 5 * i, 3), dtype=np.uint8)
        pixels[5:20, 5:30] = (255, 40 * i, 0)  # a solid block so the images differ in more than noise
        Image.fromarray(pixels).save(folder / "cases" / name)
    with open(folder / "questions.jsonl", "w") as f:
        for qid, image, question, ability, category in questions:
            f.write(
                json.dumps(
                    {"image": image, "question_id": qid, "question": question, "ability": ability, "category": category}
                )
                + "\n"
            )
    return folder


@pytest.fixture(scope="module")
def owleval_dir(tmp_path_factory):
    return make_owleval(tmp_path_factory.mktemp("owleval"))


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


def test_runner_cli_resume(owl, owleval_dir, checkpoint, tmp_path):
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
    out.write_text(json.dumps(stale) + "\n" + json.dumps(kept) + "\n")
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


# ------------------------------------------------------------------------------------------------ judge

KEYWORD_GRADES = {
    "GOOD": "The answer is right.\nGrade: A",
    "FINE": "**B**",
    "MEH": "Grade: C",
    "BAD": "Off topic.\n\n**Grade:** D",
}
# The graded model's answers: question_id -> keyword, so the fake judge's grade is known in advance.
ANSWER_KEYWORDS = {1: "GOOD", 2: "FINE", 3: "MEH", 4: "BAD", 5: "GOOD", 6: "GOOD", 7: "FINE"}


class FakeJudge(http.server.BaseHTTPRequestHandler):
    """A `/v1/chat/completions` server whose behaviour is chosen by the requested model name."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        name, messages = body["model"], body["messages"]
        content = messages[1]["content"]
        text = content if isinstance(content, str) else content[-1]["text"]
        answer = text.split("[Answer to grade]\n", 1)[1]
        reply = next((r for k, r in KEYWORD_GRADES.items() if k in answer), "Grade: D")
        if name == "garbage":
            reply = "I like turtles."
        elif name == "shy":  # no grade at first, a clean one when asked again
            reply = "B" if len(messages) > 2 else "Hard to say."
        elif name == "reject":
            return self._send(400, {"error": {"message": "images are not supported"}})
        elif name == "flaky" and not self.server.failed_once:
            self.server.failed_once = True
            return self._send(500, {"error": {"message": "overloaded"}})
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_judge():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    server.requests, server.failed_once = [], False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def answer_files(tmp_path):
    paths = []
    for model_id, prefix in (("m1", "ok"), ("m2", "other")):
        path = tmp_path / f"{model_id}.jsonl"
        with open(path, "w") as f:
            for qid, image, question, _, _ in QUESTIONS:
                keyword = ANSWER_KEYWORDS[qid] if model_id == "m1" else "BAD"
                f.write(
                    json.dumps(
                        {
                            "image": image,
                            "question_id": qid,
                            "question": question,
                            "answer": f"{prefix} {keyword} answer {qid}",
                            "model_id": model_id,
                        }
                    )
                    + "\n"
                )
        paths.append(path)
    return paths


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
