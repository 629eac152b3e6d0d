"""`owl-eval`: OwlEval with a checkpoint, in two steps, and the standard benchmarks.

    owl-eval answer --checkpoint DIR --owleval OWLEVAL_DIR --out answers.jsonl [--resume] ...
    owl-eval judge --answers A.jsonl [B.jsonl ...] --owleval OWLEVAL_DIR --judge-url URL --judge-model NAME \\
        [--out grades.jsonl [--resume]] ...
    owl-eval bench --task vqav2|coco_caption|pope|mme|mmbench|scienceqa_img --data DIR --checkpoint DIR ...

`answer` writes the released answer format (`owl_jax.eval.owleval`); `judge` grades answer files A-D with a
judge model behind an OpenAI-compatible endpoint (`owl_jax.eval.judge`). `python -m owl_jax.eval.owleval` and
`python -m owl_jax.eval.judge` are the same two commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from owl_jax.eval import judge, owleval
from owl_jax.eval.bench import cli as bench
from owl_jax.eval.grades import UNPARSEABLE, kept_grades, row_key
from owl_jax.eval.jsonl import PartialWriter, resume_rows, write_jsonl
from owl_jax.eval.judge import grade_answers
from owl_jax.eval.owleval import answer_owleval, load_questions, write_answers
from owl_jax.eval.tables import format_tables, summarize
from owl_jax.quant.spec import add_quantize_argument


def _answer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="HF-layout or converted folder with tokenizer.model or tokenizer.json"
    )
    p.add_argument("--owleval", required=True, help="folder with questions.jsonl and cases/")
    p.add_argument("--out", required=True, help="answers .jsonl to write")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature (default 1 when sampling; 0 forces greedy)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed; question q uses seed + q")
    p.add_argument(
        "--num-beams",
        type=int,
        default=1,
        help="beam search with this many beams, as the released generate(num_beams=...) (1: off; no sampling)",
    )
    p.add_argument("--model-id", default=None, help="model_id in the output (default: the checkpoint folder's name)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions by question_id")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep answers already in --out (or left in OUT.partial by an interrupted run) and skip their questions",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--lora", default=None, help="a LoRA adapter folder to apply")
    add_quantize_argument(p)
    p.add_argument("--max-length", type=int, default=None, help="KV-cache positions per conversation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _interrupted(writer: PartialWriter | None, what: str) -> int:
    """Say what an interrupted run kept and how to finish it; the exit status of a Ctrl-C."""
    if writer is None:
        print(f"interrupted: no {what} saved (--out keeps them as they arrive, for --resume)", file=sys.stderr)
    elif writer.saved:
        print(
            f"interrupted: {writer.saved} {what} saved in {writer.path}; run the same command with --resume to finish",
            file=sys.stderr,
        )
    elif writer.carried:  # resumed, nothing new yet: the earlier files are untouched
        print(f"interrupted before any new {what} were saved; --resume continues later", file=sys.stderr)
    else:
        print(f"interrupted before any {what} were saved", file=sys.stderr)
    return 130


def _answer(args: argparse.Namespace) -> int:
    """Answer the questions, saving each conversation's rows as it finishes; returns the exit status."""
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    if args.num_beams < 1:
        print("error: --num-beams must be at least 1", file=sys.stderr)
        return 2
    if args.num_beams > 1 and _samples(args):
        print(
            "error: --num-beams above 1 is beam search, which does not sample; drop --top-k, --top-p and --temperature",
            file=sys.stderr,
        )
        return 2
    try:  # fail on a bad folder or answers file before spending time on the model
        load_questions(args.owleval, check_images=True)
        earlier = resume_rows(args.out) if args.resume else []
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = {row["question_id"]: row for row in earlier if isinstance(row.get("question_id"), int)}
    if args.resume:
        print(f"resuming: {len(done)} answers already in {args.out}", file=sys.stderr)
    # Rows go to OUT.partial as conversations finish, so an interrupted run keeps them for --resume; OUT is
    # written (sorted, without repeats) once all are in.
    writer = PartialWriter(args.out, carried=done.values())
    try:
        return _answer_with_model(args, done, writer)
    except KeyboardInterrupt:
        return _interrupted(writer, "answers")
    except (OSError, ValueError) as e:  # a checkpoint that cannot be loaded, a case image that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        writer.close()


def _samples(args: argparse.Namespace) -> bool:
    """Whether `answer`'s options ask for sampling (any of top-k, top-p or a temperature other than 0)."""
    return args.temperature != 0 and (args.top_k > 0 or args.top_p < 1 or args.temperature is not None)


def _answer_with_model(args: argparse.Namespace, done: dict[int, dict], writer: PartialWriter) -> int:
    import owl_jax
    from owl_jax.inference.generate import GenerationConfig

    start = time.perf_counter()
    model, processor = owl_jax.from_pretrained(
        args.checkpoint, dtype=args.dtype, lora=args.lora, quantize=args.quantize, show_progress=not args.quiet
    )
    if processor is None:
        print(f"error: {args.checkpoint} has no tokenizer.model or tokenizer.json", file=sys.stderr)
        return 2
    sample = _samples(args)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample and args.temperature else 1.0,
        top_k=args.top_k if sample else 0,
        top_p=args.top_p if sample else 1.0,
        seed=args.seed,
        eos_token_id=processor.eos_token_id,
        bos_token_id=processor.bos_token_id,
        pad_token_id=processor.pad_token_id,
        num_beams=args.num_beams,
    )
    model_id = args.model_id or os.path.basename(os.path.normpath(args.checkpoint))
    rows = answer_owleval(
        model,
        processor,
        args.owleval,
        config=config,
        model_id=model_id,
        max_length=args.max_length,
        limit=args.limit,
        skip=done,
        on_answer=writer.append,
        show_progress=not args.quiet,
    )
    total = len(set(done) | {r["question_id"] for r in rows})
    write_answers(args.out, list(done.values()) + rows)
    writer.finish()
    print(
        f"{len(rows)} questions answered, {total} answers in {args.out} ({time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    return 0


def _judge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", nargs="+", required=True, help="answer files in the released OwlEval format")
    p.add_argument("--owleval", required=True, help="folder with questions.jsonl and cases/")
    p.add_argument("--judge-url", required=True, help="OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", required=True, help="model name to ask for")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--judge-sees-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send each case image as a data URL (turn off for text-only judges)",
    )
    p.add_argument(
        "--out", default=None, help="write one grade row per answer here (.jsonl; OUT.partial while grading)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the grades by this judge model already in --out (or left in OUT.partial by an interrupted run)",
    )
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles each time)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length limit sent to the judge (0: none)")
    p.add_argument("--json", action="store_true", help="print the tables as JSON instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _judge(args: argparse.Namespace) -> int:
    """Grade the answer files and print the tables; returns the exit status (1: nothing could be graded)."""
    if args.resume and not args.out:
        print("error: --resume needs --out (the grades file to continue)", file=sys.stderr)
        return 2
    try:
        earlier = resume_rows(args.out) if args.resume else []
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = kept_grades(earlier, args.judge_model)
    if args.resume:
        print(f"resuming: {len(done)} grades by {args.judge_model} already in {args.out}", file=sys.stderr)
    writer = PartialWriter(args.out, carried=earlier) if args.out else None
    try:
        grades = grade_answers(
            args.answers,
            args.owleval,
            judge_url=args.judge_url,
            judge_model=args.judge_model,
            api_key=args.api_key,
            sees_images=args.judge_sees_images,
            concurrency=args.concurrency,
            timeout=args.timeout,
            retries=args.retries,
            backoff=args.backoff,
            max_tokens=args.max_tokens,
            show_progress=not args.quiet,
            done=done,
            on_grade=None if writer is None else lambda row: writer.append([row]),
        )
        if writer is not None:  # the complete file, which the tables below are made of
            write_jsonl(args.out, grades)
            writer.finish()
    except KeyboardInterrupt:
        return _interrupted(writer, "grades")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if writer is not None:
            writer.close()
    stale = len(set(done) - {row_key(g) for g in grades})
    if stale:
        print(f"note: {stale} earlier grades were of answers no longer in the answer files; left out", file=sys.stderr)
    failed = [g for g in grades if g["grade"] == UNPARSEABLE]
    for g in failed[:5]:
        print(f"no grade for {g['model_id']} question {g['question_id']}: {g['error']}", file=sys.stderr)
    if len(failed) > 5:
        print(f"... {len(failed) - 5} more without a grade", file=sys.stderr)
    tables = summarize(grades)
    print(json.dumps(tables, indent=1) if args.json else format_tables(tables))
    return 1 if grades and len(failed) == len(grades) else 0  # nothing graded: most likely the judge is down


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="owl-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, module, add_arguments in (
        ("answer", owleval, _answer_arguments),
        ("judge", judge, _judge_arguments),
        ("bench", bench, bench.add_arguments),
    ):
        add_arguments(
            sub.add_parser(
                name,
                help=module.__doc__.splitlines()[0],
                description=module.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return p


def main(argv: list[str] | None = None) -> int:
    """`owl-eval answer|judge|bench ...`; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return bench.run(args)
    return _answer(args) if args.command == "answer" else _judge(args)


def answer_main(argv: list[str] | None = None) -> int:
    """`owl-eval answer` with `argv` (default: this process's arguments)."""
    return main(["answer", *(sys.argv[1:] if argv is None else argv)])


def judge_main(argv: list[str] | None = None) -> int:
    """`owl-eval judge` with `argv` (default: this process's arguments)."""
    return main(["judge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
