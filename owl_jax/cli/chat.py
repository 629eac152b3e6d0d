"""`owl-chat`: chat with a checkpoint in the terminal.

    owl-chat --checkpoint DIR [--image a.jpg ...] [--prompt "..."]

Without `--prompt` it is an interactive session (answers stream in as they are decoded; the KV cache is
kept between turns). Commands: `/image PATH` attaches an image to the next question, `/reset` starts a new
conversation, `/quit` (or end of input) leaves. With `--prompt` it answers once and exits.

Input lines must be UTF-8: a line that is not is refused with a one-line error and skipped (the session
goes on). Exit status: 0; 1 when the one-shot answer failed, or when input that is not a terminal had a
refused line, a refused /image or a failed answer; 2 for bad arguments (argparse's message), a checkpoint
that cannot be loaded or an --image that cannot be read (one line naming it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator

PROG = "owl-chat"


def _number(kind: type, rule: str, check: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: `kind(text)` that passes `check`, else an argparse error stating `rule`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {rule}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not check(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be {rule}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF-layout or converted folder with tokenizer.model")
    p.add_argument("--image", action="append", default=[], help="image for the first question (repeatable)")
    p.add_argument("--prompt", default=None, help="answer this one question and exit")
    p.add_argument("--max-new-tokens", type=_number(int, "an integer >= 1", lambda v: v >= 1), default=256)
    p.add_argument(
        "--temperature",
        type=_number(float, "a number >= 0 (0: greedy)", lambda v: v >= 0),
        default=0.0,
        help="0 decodes greedily",
    )
    p.add_argument("--top-k", type=_number(int, "an integer >= 0 (0: no top-k)", lambda v: v >= 0), default=0)
    p.add_argument("--top-p", type=_number(float, "a number in (0, 1]", lambda v: 0 < v <= 1), default=1.0)
    p.add_argument("--seed", type=_number(int, "an integer from 0 to 2**63 - 1", lambda v: 0 <= v < 2**63), default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--max-length",
        type=_number(int, "an integer >= 1", lambda v: v >= 1),
        default=2048,
        help="positions for the whole conversation",
    )
    p.add_argument(
        "--unstack-layers",
        action="store_true",
        help="decode from one weight buffer per LLM layer (faster on a GPU; the LLM layers' memory twice)",
    )
    return p


def _fail(message: str, status: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 500 else text[:500] + "..."


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be an image file (checked before the model loads), or None."""
    if not os.path.exists(path):
        return "no such file"
    if not os.path.isfile(path):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # e.g. a non-UTF-8 argument, decoded by Python into lone surrogates
        return False
    return True


def _lines(stream) -> Iterator[tuple[int, str | Exception]]:
    """`(number, text or None)` for each input line; None for a line that is not valid UTF-8."""
    raw = getattr(stream, "buffer", None)
    number = 0
    while True:
        if raw is not None:
            data = raw.readline()
            if not data:
                return
            number += 1
            try:
                yield number, data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, e
        else:  # a text stream without bytes underneath (e.g. replaced by a caller)
            text = stream.readline()
            if not text:
                return
            number += 1
            yield number, text if _is_text(text) else UnicodeError("it holds text that is not valid Unicode")


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint and chat (or answer `--prompt` once); returns the exit status."""
    args = _parser().parse_args(argv)
    if args.prompt is not None and not _is_text(args.prompt):
        return _fail("--prompt is not valid UTF-8 text")
    for path in args.image:
        why = _unreadable(path)
        if why is not None:
            return _fail(f"cannot read image {path!r}: {why}")
    try:
        return _chat(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _chat(args: argparse.Namespace) -> int:
    import owl_jax
    from owl_jax.inference.generate import GenerationConfig, Generator
    from owl_jax.inference.session import ChatSession

    try:
        model, processor = owl_jax.from_pretrained(args.checkpoint, dtype=args.dtype, show_progress=False)
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        return _fail(f"cannot load the checkpoint {args.checkpoint}: {_one_line(e)}")
    if processor is None:
        return _fail(f"{args.checkpoint} has no tokenizer.model")
    for path in args.image:  # decodable? (the files exist: checked before loading the model)
        try:
            processor.load_image(path)
        except (ValueError, OSError) as e:
            return _fail(f"cannot read image {path!r}: {_one_line(e)}")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    generator = Generator(model, unstack_layers=args.unstack_layers)
    session = ChatSession(generator, processor, max_length=args.max_length, config=config)
    images = list(args.image)

    def answer(question: str) -> bool:
        nonlocal images
        try:
            session.ask(question, images, stream=lambda piece: print(piece, end="", flush=True))
            return True
        except ValueError as e:
            print(f"\nerror: {_one_line(e)}", file=sys.stderr)
            return False
        finally:
            images = []
            print(flush=True)

    if args.prompt is not None:
        return 0 if answer(args.prompt) else 1
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask a question. /image PATH attaches an image, /reset starts over, /quit leaves.", file=sys.stderr)
    failed = False
    lines = _lines(sys.stdin)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        number, line = next(lines, (0, None))
        if line is None:  # end of input
            break
        if isinstance(line, Exception):
            print(f"error: input line {number} is not valid UTF-8 ({_one_line(line)}); skipped", file=sys.stderr)
            failed = True
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            images = []
            print("(new conversation)", file=sys.stderr)
        elif line.startswith("/image"):
            path = line[len("/image") :].strip()
            why = _unreadable(path) if path else "no path given (/image PATH)"
            if why is None:
                try:
                    processor.load_image(path)
                except (ValueError, OSError) as e:
                    why = _one_line(e)
            if why is not None:
                print(f"error: cannot read image {path!r}: {why}", file=sys.stderr)
                failed = True
                continue
            images.append(path)
            print(f"(image {path} attached to the next question)", file=sys.stderr)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; use /image PATH, /reset or /quit", file=sys.stderr)
        else:
            if interactive:
                print("owl> ", end="", flush=True)
            failed = not answer(line) or failed
    return 1 if failed and not interactive else 0


if __name__ == "__main__":
    sys.exit(main())
