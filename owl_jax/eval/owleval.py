"""Answer the OwlEval questions with a checkpoint, writing the released answer format.

    python -m owl_jax.eval.owleval --checkpoint DIR --owleval OWLEVAL_DIR --out answers.jsonl \
        [--max-new-tokens 512] [--top-k 5 --seed 0] [--model-id NAME] [--limit N] [--resume]

An OwlEval folder holds `questions.jsonl` (one object a line: `image`, `question_id`, `question`, `ability` such
as "a,b,e", `category` a list of "single_turn"/"multi_turn") and `cases/<image>`. Questions that share an image
and are marked multi_turn form one conversation, asked in question_id order, each turn seeing the conversation
so far; a question marked only single_turn is asked alone. A question marked both is the first turn of its
conversation, which is the same as asking it alone, so it is answered once. The output has one line per
question in question_id order: `{"image", "question_id", "question", "answer", "model_id"}`.

Decoding is greedy unless `--top-k`, `--top-p` or `--temperature` ask for sampling; when sampling, question q is
decoded with seed `seed + q`, so an answer does not depend on which other questions ran (or were resumed).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from owl_jax.eval.jsonl import read_jsonl, write_jsonl

if TYPE_CHECKING:  # the runner imports JAX only when it answers
    from owl_jax.inference.generate import GenerationConfig, Generator
    from owl_jax.inference.session import ChatSession

QUESTIONS_FILE = "questions.jsonl"
CASES_DIR = "cases"
CATEGORIES = ("single_turn", "multi_turn")
ABILITIES = {
    "a": "instruction understanding",
    "b": "visual understanding",
    "c": "optical character recognition",
    "d": "knowledge transfer",
    "e": "reasoning",
    "f": "multi-turn dialogue",
}


@dataclasses.dataclass(frozen=True)
class Question:
    """One OwlEval question; `where` is "file:line" for error messages."""

    question_id: int
    image: str
    question: str
    abilities: tuple[str, ...]
    categories: tuple[str, ...]
    where: str = ""

    @property
    def single_turn(self) -> bool:
        return "single_turn" in self.categories

    @property
    def multi_turn(self) -> bool:
        return "multi_turn" in self.categories


def load_questions(owleval_dir: str | os.PathLike, *, check_images: bool = False) -> list[Question]:
    """The questions of an OwlEval folder, sorted by question_id.

    Raises ValueError naming `questions.jsonl:line` for a missing or mistyped field, an unknown category or
    ability, or a repeated question_id; FileNotFoundError when `check_images` and a case image is missing.
    """
    path = os.path.join(os.fspath(owleval_dir), QUESTIONS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist; --owleval must be a folder with {QUESTIONS_FILE} and {CASES_DIR}/"
        )
    questions: dict[int, Question] = {}
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        for key, kind in (
            ("image", str),
            ("question_id", int),
            ("question", str),
            ("ability", str),
            ("category", list),
        ):
            if not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}, got {row.get(key)!r}")
        categories = tuple(row["category"])
        if not categories or any(c not in CATEGORIES for c in categories):
            raise ValueError(f"{where}: category must list some of {CATEGORIES}, got {row['category']!r}")
        abilities = tuple(a.strip() for a in row["ability"].split(",") if a.strip())
        if any(a not in ABILITIES for a in abilities):
            raise ValueError(f"{where}: ability letters must be among {','.join(ABILITIES)}, got {row['ability']!r}")
        qid = row["question_id"]
        if qid in questions:
            raise ValueError(f"{where}: question_id {qid} repeats {questions[qid].where}")
        questions[qid] = Question(qid, row["image"], row["question"], abilities, categories, where)
    if check_images:
        missing = [
            f"{q.image} ({q.where})" for q in questions.values() if not os.path.isfile(image_path(owleval_dir, q))
        ]
        if missing:
            raise FileNotFoundError(
                f"missing case images in {os.path.join(os.fspath(owleval_dir), CASES_DIR)}: " + ", ".join(missing)
            )
    return [questions[k] for k in sorted(questions)]


def image_path(owleval_dir: str | os.PathLike, question: Question) -> str:
    return os.path.join(os.fspath(owleval_dir), CASES_DIR, question.image)


def conversations(questions: Sequence[Question]) -> list[list[Question]]:
    """Group questions into what is asked in one session, in order of each group's first question_id.

    A multi_turn question joins the conversation of its image (turns in question_id order); any other
    question is a group of its own. A question marked single_turn that is not the first turn of its
    conversation cannot be both at once; it is asked as a turn (with a warning).
    """
    groups: list[list[Question]] = []
    by_image: dict[str, list[Question]] = {}
    for q in sorted(questions, key=lambda q: q.question_id):
        if not q.multi_turn:
            groups.append([q])
        elif q.image in by_image:
            by_image[q.image].append(q)
            if q.single_turn:
                warnings.warn(
                    f"{q.where}: question {q.question_id} is single_turn and multi_turn but not the first "
                    f"turn of the conversation on {q.image}; it is answered as a turn",
                    stacklevel=2,
                )
        else:
            by_image[q.image] = [q]
            groups.append(by_image[q.image])
    return groups


def _ask(session: ChatSession, q: Question, images: list[str], config: GenerationConfig) -> str:
    """One turn; max_new_tokens shrinks to what the session's cache has left (long conversations)."""
    prompt_len = len(session.processor.encode_prompt(session.prompt_with(q.question, ["image"] * len(images))))
    room = session.max_length - prompt_len
    if room < 1:
        warnings.warn(
            f"question {q.question_id}: the conversation already fills the {session.max_length} "
            "positions; its answer is left empty",
            stacklevel=2,
        )
        return ""
    cfg = config
    if room < cfg.max_new_tokens:
        warnings.warn(
            f"question {q.question_id}: only {room} positions left; max_new_tokens {cfg.max_new_tokens} -> {room}",
            stacklevel=2,
        )
        cfg = dataclasses.replace(cfg, max_new_tokens=room, min_new_tokens=min(cfg.min_new_tokens, room))
    if cfg.do_sample:
        cfg = dataclasses.replace(cfg, seed=cfg.seed + q.question_id)
    try:
        return session.ask(q.question, images, config=cfg)
    except ValueError as e:
        raise ValueError(f"{q.where}: question {q.question_id}: {e}") from e


def answer_owleval(
    model: Any,
    processor: Any,
    owleval_dir: str | os.PathLike,
    *,
    config: GenerationConfig | None = None,
    model_id: str = "owl_jax",
    max_length: int | None = None,
    limit: int | None = None,
    skip: Collection[int] = (),
    on_answer: Callable[[list[dict]], None] | None = None,
    generator: Generator | None = None,
    show_progress: bool = True,
) -> list[dict]:
    """Answer an OwlEval folder's questions (see the module docstring for how turns are grouped).

    Args:
      model, processor: from `owl_jax.from_pretrained`.
      config: decoding options (default: greedy, 512 new tokens, the tokenizer's BOS, EOS and padding).
      model_id: written into every row.
      max_length: KV-cache positions per conversation (default: the LLM's `max_position_embeddings`); a turn
        gets at most what is left of it.
      limit: answer only the first `limit` questions by question_id.
      skip: question_ids already answered; a conversation is skipped only when all its turns are (its later
        turns need the earlier answers in the cache, so a partly answered one is answered again).
      on_answer: called with the rows of each finished conversation (or single question), for incremental writes.
      generator: a `Generator` for `model` to reuse its compiled steps.

    Returns:
      The new rows `{"image", "question_id", "question", "answer", "model_id"}` in question_id order.
    """
    from tqdm.auto import tqdm

    from owl_jax.inference.generate import GenerationConfig, Generator
    from owl_jax.inference.session import ChatSession

    if processor is None:
        raise ValueError(
            "the checkpoint has no tokenizer.model or tokenizer.json, so there is no processor to encode questions"
        )
    special = dict(
        eos_token_id=processor.eos_token_id, bos_token_id=processor.bos_token_id, pad_token_id=processor.pad_token_id
    )
    config = (config or GenerationConfig(max_new_tokens=512, **special)).validate()
    questions = load_questions(owleval_dir, check_images=True)
    if limit is not None:
        questions = questions[:limit]
    skip = set(skip)
    groups = [g for g in conversations(questions) if not all(q.question_id in skip for q in g)]
    generator = generator or Generator(model)
    session = ChatSession(
        generator, processor, max_length=max_length or model.config.text.max_position_embeddings, config=config
    )
    rows: list[dict] = []
    with tqdm(
        total=sum(len(g) for g in groups),
        desc="OwlEval",
        unit="q",
        file=sys.stderr,
        disable=not show_progress,
        dynamic_ncols=True,
    ) as bar:
        for group in groups:
            session.reset()  # every conversation starts from an empty cache
            group_rows = []
            for turn, q in enumerate(group):
                images = [image_path(owleval_dir, q)] if turn == 0 else []  # the image opens the conversation
                answer = _ask(session, q, images, config)
                group_rows.append(
                    {
                        "image": q.image,
                        "question_id": q.question_id,
                        "question": q.question,
                        "answer": answer,
                        "model_id": model_id,
                    }
                )
                bar.update(1)
            rows += group_rows
            if on_answer is not None:
                on_answer(group_rows)
    return sorted(rows, key=lambda r: r["question_id"])


def write_answers(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows one JSON object a line in question_id order (later rows win on a repeated id), atomically."""
    merged = {r["question_id"]: r for r in rows}
    write_jsonl(path, (merged[qid] for qid in sorted(merged)))


if __name__ == "__main__":  # the same command as `owl-eval answer`
    from owl_jax.cli.eval import answer_main

    sys.exit(answer_main())
