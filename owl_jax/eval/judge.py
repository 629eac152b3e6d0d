"""Grade OwlEval answers A-D with a judge model behind an OpenAI-compatible `/chat/completions` endpoint.

    python -m owl_jax.eval.judge --answers A.jsonl [B.jsonl ...] --owleval OWLEVAL_DIR \
        --judge-url http://127.0.0.1:8000/v1 --judge-model NAME [--api-key KEY] [--out grades.jsonl [--resume]] \
        [--concurrency 4] [--no-judge-sees-images]

The mPLUG-Owl paper graded OwlEval by hand on four levels; the judge gets the same scale (`RUBRIC`), the
question (from `questions.jsonl`, which also gives category and abilities), for a multi-turn question the
earlier turns with the answers the graded model gave, the answer, and the image (as a data URL) unless the
judge is text-only. A reply is parsed for a grade (`parse_grade`); a reply without one is asked once more,
then recorded as "?"; a request that fails after its retries is recorded as "?" with the error. No grade is
ever guessed. The tables count a question under every category it lists (the paper's convention: the 20
questions that open a conversation count as single-turn and as multi-turn).

With `--out`, grades are appended to `OUT.partial` as they arrive and `OUT` is written when all are in; after
Ctrl-C (or a crash), the same command with `--resume` grades only what is missing: answers without a grade
by this judge model, or whose text changed since.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import http.client
import json
import os
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from owl_jax.eval.grades import GRADES, SCORES, UNPARSEABLE, Key, grade_key  # noqa: F401 (SCORES: offered here too)
from owl_jax.eval.owleval import Question, conversations, image_path, load_questions, read_jsonl
from owl_jax.eval.tables import PAPER, SHORT_ABILITIES, format_tables, summarize  # noqa: F401 (offered here too)

RUBRIC = """You grade the answers of an AI assistant that was shown an image and asked about it.
Give the answer exactly one of four grades:
A: correct and satisfying. It does what was asked, agrees with the image, and a demanding user would be content.
B: acceptable. It answers the request and is essentially right, with minor imperfections such as a small \
inaccuracy, a small omission, or needless content.
C: it responds to the request but has significant errors: wrong statements about the image or the world, text \
misread, faulty reasoning or arithmetic, or a major part of the request left undone.
D: irrelevant or invalid. It does not address the request, or is empty, unreadable or mostly made up.
Judge what the answer says, not its length or style. In a conversation, grade only the last answer; the earlier \
turns are context, and a later question may refer back to them.
Give at most two sentences of justification, then end with a line of the form "Grade: X" with X one of A, B, C, D."""
TEXT_ONLY_NOTE = """
You cannot see the image. Judge whether the answer addresses the question and is plausible and consistent; a \
claim about the image that you cannot check is not an error unless the question or the answer contradicts it."""
REASK = "Give only the grade for the last answer, as one line: Grade: X (X is A, B, C or D)."

_LABELLED = re.compile(
    r"(?i:\b(?:final\s+)?(?:grade|rating|verdict)\b)[\s*_`]*(?::|：|=|-|\bis\b)[\s*_`'\"(\[]*"
    r"([A-D])(?![A-Za-z0-9])"
)
_LEADING = re.compile(r"^[\s*_`'\"(\[]*([A-D])[*_`'\")\]]*\s*(?:[.:)\-]|$)")
_MARKUP = " \t\r\n*_`'\"()[].:!"


def parse_grade(reply: str | None) -> str | None:
    """The grade A-D in a judge's reply, or None when there is none to be sure of.

    Accepted: a labelled grade ("Grade: B", "**Grade:** C", "final grade is A"; the last one wins), a reply
    that is only a letter ("B", "**B**", "(C)."), a reply that starts with one ("A. Correct ..."), or a last
    line that is only a letter. A lone capital inside prose ("A cat sits ...") is not a grade.
    """
    if not reply:
        return None
    labelled = _LABELLED.findall(reply)
    if labelled:
        return labelled[-1]
    if reply.strip(_MARKUP) in GRADES:
        return reply.strip(_MARKUP)
    lines = [line for line in reply.splitlines() if line.strip()]
    last = lines[-1].strip(_MARKUP) if lines else ""
    if last in GRADES:
        return last
    leading = _LEADING.match(reply)
    return leading.group(1) if leading else None


class JudgeError(Exception):
    """The judge could not be asked (after retries) or refused the request."""


@dataclasses.dataclass
class JudgeClient:
    """A minimal `/chat/completions` client (stdlib only) with retries and exponential backoff.

    `url` is the API base ("http://host:port/v1") or the full `.../chat/completions` address.
    """

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 3
    backoff: float = 1.0
    max_tokens: int = 512

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def chat(self, messages: list[dict]) -> str:
        """The text of the first choice; retries network errors, timeouts, 5xx, 408 and 429."""
        payload = {"model": self.model, "messages": messages, "temperature": 0}
        if self.max_tokens:
            payload["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(payload).encode()
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _reply_text(json.loads(response.read()))
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code} from {self.endpoint}: {e.read()[:300].decode('utf-8', 'replace')}"
                if e.code < 500 and e.code not in (408, 429):  # the request itself is wrong: retrying cannot help
                    raise JudgeError(
                        error
                        + (" (a text-only judge needs --no-judge-sees-images)" if e.code in (400, 415, 422) else "")
                    ) from None
            except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, timeouts, bad bodies
                error = f"{type(e).__name__}: {e}"
        raise JudgeError(f"{self.retries + 1} attempts failed; last: {error}")


def _reply_text(body: Any) -> str:
    """The reply's text; ValueError (retried like a bad body, then a failed grade) naming the field otherwise."""
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat completion: {str(body)[:200]}") from None
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # some servers return content parts
        texts = [part.get("text") or "" for part in content if isinstance(part, dict)]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    shown = json.dumps(content)[:100]
    raise ValueError(f"the reply's choices[0].message.content is {type(content).__name__} {shown}, not text")


@functools.lru_cache(maxsize=64)
def image_data_url(path: str) -> str:
    """The image file as a `data:` URL; the type comes from its bytes (OwlEval has a PNG named .jpg)."""
    with open(path, "rb") as f:
        raw = f.read()
    kind = (
        "image/png"
        if raw.startswith(b"\x89PNG")
        else "image/gif"
        if raw[:4] == b"GIF8"
        else "image/webp"
        if raw[8:12] == b"WEBP"
        else "image/jpeg"
    )
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


@dataclasses.dataclass
class Item:
    """One answer to grade: `history` holds the earlier (question, answer) turns of its conversation."""

    model_id: str
    source: str
    question: Question
    answer: str
    history: list[tuple[str, str]]


def build_messages(item: Item, image_url: str | None) -> list[dict]:
    """The judge's messages: the rubric as system, then the image part (if any) and the text of the case."""
    parts = []
    if item.history:
        parts.append(
            "[Earlier turns of this conversation]\n" + "\n".join(f"User: {q}\nAssistant: {a}" for q, a in item.history)
        )
    parts.append(f"[Question]\n{item.question.question}")
    parts.append(f"[Answer to grade]\n{item.answer}")
    text = "\n\n".join(parts)
    system = RUBRIC if image_url else RUBRIC + TEXT_ONLY_NOTE
    user: Any = (
        text
        if image_url is None
        else [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def load_answers(paths: Sequence[str | os.PathLike], questions: Sequence[Question]) -> list[Item]:
    """The answers of every file, each with its conversation history; ValueError names file:line."""
    by_id = {q.question_id: q for q in questions}
    group_of = {q.question_id: g for g in conversations(questions) for q in g}
    items: list[Item] = []
    seen_models: dict[str, str] = {}
    for path in map(os.fspath, paths):
        stem = os.path.splitext(os.path.basename(path))[0]
        answers: dict[int, tuple[str, str]] = {}
        for n, row in read_jsonl(path):
            qid, answer = row.get("question_id"), row.get("answer", "")
            if qid not in by_id:
                raise ValueError(f"{path}:{n}: question_id {qid!r} is not in the OwlEval questions")
            if qid in answers:
                raise ValueError(f"{path}:{n}: question_id {qid} is answered twice")
            if answer is not None and not isinstance(answer, str):
                raise ValueError(f"{path}:{n}: answer must be a string, got {type(answer).__name__}")
            answers[qid] = (answer or "", str(row.get("model_id") or stem))
        for qid in sorted(answers):
            answer, model_id = answers[qid]
            if seen_models.setdefault(model_id, path) != path:  # two files, one model_id: keep them apart
                model_id = f"{model_id} [{stem}]"
            group = group_of[qid]
            earlier = group[: group.index(by_id[qid])]
            history = [(q.question, answers.get(q.question_id, ("(no answer recorded)", ""))[0]) for q in earlier]
            items.append(Item(model_id, os.path.basename(path), by_id[qid], answer, history))
    return items


def item_key(item: Item, judge_model: str) -> Key:
    """The key (`owl_jax.eval.grades`) of the grade of `item` by `judge_model`."""
    return grade_key(judge_model, item.model_id, item.source, item.question.question_id, item.answer)


def grade_item(client: JudgeClient, item: Item, image_url: str | None) -> dict:
    """Grade one answer: `{"model_id", "answers_file", "question_id", "image", "category", "ability", "answer",
    "judge_model", "grade", "replies", "error"}` with grade one of A-D or "?" (no grade after one re-ask, or
    `error` says why)."""
    messages = build_messages(item, image_url)
    replies: list[str] = []
    grade, error = None, None
    try:
        replies.append(client.chat(messages))
        grade = parse_grade(replies[-1])
        if grade is None:  # ask once more, showing the judge its reply and the expected form
            replies.append(
                client.chat(
                    messages + [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": REASK}]
                )
            )
            grade = parse_grade(replies[-1])
            if grade is None:
                error = "no grade found in the judge's replies"
    except JudgeError as e:
        error = str(e)
    q = item.question
    return {
        "model_id": item.model_id,
        "answers_file": item.source,
        "question_id": q.question_id,
        "image": q.image,
        "category": list(q.categories),
        "ability": ",".join(q.abilities),
        "answer": item.answer,
        "judge_model": client.model,
        "grade": grade or UNPARSEABLE,
        "replies": replies,
        "error": error,
    }


def grade_answers(
    answer_files: Sequence[str | os.PathLike],
    owleval_dir: str | os.PathLike,
    *,
    judge_url: str,
    judge_model: str,
    api_key: str | None = None,
    sees_images: bool = True,
    concurrency: int = 4,
    timeout: float = 120.0,
    retries: int = 3,
    backoff: float = 1.0,
    max_tokens: int = 512,
    show_progress: bool = True,
    done: Mapping[Key, dict] | None = None,
    on_grade: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Grade every answer of `answer_files` (released format) against the questions of `owleval_dir`.

    `done` holds grades of an earlier run by key (`owl_jax.eval.grades.kept_grades`); those answers are not
    asked again. `on_grade` is called with each new row as it arrives, in this thread (for incremental writes).
    On Ctrl-C this raises KeyboardInterrupt at once; requests in flight are abandoned.

    Returns one row per answer (see `grade_item`), in file order then question_id order.
    """
    from tqdm.auto import tqdm

    questions = load_questions(owleval_dir, check_images=sees_images)
    items = load_answers(answer_files, questions)
    client = JudgeClient(judge_url, judge_model, api_key, timeout, retries, backoff, max_tokens)
    urls = {q.image: image_data_url(image_path(owleval_dir, q)) for q in questions} if sees_images else {}
    done = done or {}
    results: list[dict | None] = [done.get(item_key(item, judge_model)) for item in items]
    todo = [i for i, row in enumerate(results) if row is None]
    with tqdm(
        total=len(items), initial=len(items) - len(todo), desc="judge", unit="answer", file=sys.stderr,
        disable=not show_progress,
    ) as bar:  # fmt: skip

        def finished(j: int, row: dict) -> None:
            results[todo[j]] = row
            if on_grade is not None:
                on_grade(row)
            bar.update(1)

        _in_parallel(
            lambda item: grade_item(client, item, urls.get(item.question.image)),
            [items[i] for i in todo],
            concurrency,
            finished,
        )
    return results  # type: ignore[return-value]


def _in_parallel(fn: Callable[[Any], Any], jobs: Sequence[Any], concurrency: int, on_result: Callable) -> None:
    """`fn(job)` for every job on up to `concurrency` threads; `on_result(index, result)` in this thread as
    each finishes. The threads are daemons and this thread stops at the first error or Ctrl-C: a thread pool
    would make the process wait at exit for every request in flight (minutes, with retries)."""
    pending: queue.SimpleQueue = queue.SimpleQueue()
    for index, job in enumerate(jobs):
        pending.put((index, job))
    finished: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            try:
                index, job = pending.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((index, fn(job), None))
            except BaseException as e:  # handed to the main thread
                finished.put((index, None, e))

    for _ in range(min(max(1, concurrency), len(jobs))):
        threading.Thread(target=work, name="judge", daemon=True).start()
    try:
        for _ in range(len(jobs)):
            index, result, error = finished.get()
            if error is not None:
                raise error
            on_result(index, result)
    finally:
        stop.set()


if __name__ == "__main__":  # the same command as `owl-eval judge`
    from owl_jax.cli.eval import judge_main

    sys.exit(judge_main())
