"""The tiny OwlEval folder that the answering and judging tests share, and a fake judge server."""

import http.server
import json
import threading

import pytest

from helpers import QUESTIONS, make_owleval


@pytest.fixture(scope="module")
def owleval_dir(tmp_path_factory):
    return make_owleval(tmp_path_factory.mktemp("owleval"))


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
        elif name == "odd" and ("MEH" in answer or "BAD" in answer):  # content that is not text
            reply = 3 if "MEH" in answer else {"grade": "D"}
        elif name == "slow" and len(self.server.requests) > 2:  # two quick grades, then it hangs
            self.server.release.wait(30)
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
    server.requests, server.failed_once, server.release = [], False, threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.release.set()
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
