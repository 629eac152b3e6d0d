"""`owl-chat`: chat with a checkpoint in the terminal.

    owl-chat --checkpoint DIR [--image a.jpg ...] [--video clip.mp4 ... [--num-frames 4]] [--prompt "..."]

Without `--prompt` it is an interactive session (answers stream in as they are decoded; the KV cache is
kept between turns). Commands: `/image PATH` attaches an image to the next question, `/video PATH` a video
(video checkpoints), `/reset` starts a new conversation, `/quit` (or end of input) leaves. With `--prompt`
it answers once and exits. A question shows its media in the order they were attached (`--image` files
before `--video` files).

Videos are read when they are attached (`--num-frames` frames each, sampled as the released video model
samples them), so an unreadable or corrupt file is refused at once, and before the model loads for
`--video`. A checkpoint of the image layout refuses videos.

Input lines must be UTF-8: a line that is not is refused with a one-line error and skipped (the session
goes on). Exit status: 0; 1 when the one-shot answer failed, or when input that is not a terminal had a
refused line, a refused /image or /video or a failed answer; 2 for bad arguments (argparse's message), a
checkpoint that cannot be loaded, an --image or --video that cannot be read, or --video with a checkpoint
of the image layout (one line naming it).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator

from owl_jax.quant.spec import add_quantize_argument

PROG = "owl-chat"
MIN_FRAMES = 2  # owl_jax.data.video.MIN_FRAMES, without importing it before the arguments are checked


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
    p.add_argument(
        "--checkpoint", required=True, help="HF-layout or converted folder with tokenizer.model or tokenizer.json"
    )
    p.add_argument("--image", action="append", default=[], help="image for the first question (repeatable)")
    p.add_argument(
        "--video", action="append", default=[], help="video for the first question (repeatable; video checkpoints)"
    )
    p.add_argument(
        "--num-frames",
        type=_number(int, f"an integer >= {MIN_FRAMES}", lambda v: v >= MIN_FRAMES),
        default=4,
        help="frames sampled from each video (default 4, as the released video model)",
    )
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
    p.add_argument(
        "--num-beams",
        type=_number(int, "an integer >= 1", lambda v: v >= 1),
        default=1,
        help="beam search with this many beams, as the released generate(num_beams=...) (default 1: off); "
        "it does not sample, and the answer appears once the search ends",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_quantize_argument(p)
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


def _read_video(path: str, num_frames: int) -> tuple[object | None, str | None]:
    """`(frames (T, 224, 224, 3) uint8, None)` of a video file, or `(None, why it cannot be read)`."""
    why = _unreadable(path)
    if why is not None:
        return None, why
    from owl_jax.data.video import read_frames

    name = f"video {path!r}"
    try:
        return read_frames(path, num_frames, name=name), None
    except (ValueError, OSError) as e:  # VideoError is a ValueError
        text = _one_line(e)
        return None, text[len(name) :].lstrip(": ") if text.startswith(name) else text


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
    if args.num_beams > 1 and args.temperature > 0:
        return _fail("--num-beams above 1 is beam search, which does not sample; drop --temperature")
    if args.prompt is not None and not _is_text(args.prompt):
        return _fail("--prompt is not valid UTF-8 text")
    for path in args.image:
        why = _unreadable(path)
        if why is not None:
            return _fail(f"cannot read image {path!r}: {why}")
    videos = []
    for path in args.video:  # read now: a long model load should not end in a refused video
        frames, why = _read_video(path, args.num_frames)
        if why is not None:
            return _fail(f"cannot read video {path!r}: {why}")
        videos.append(frames)
    try:
        return _chat(args, videos)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _chat(args: argparse.Namespace, videos: list) -> int:
    import owl_jax
    from owl_jax.inference.generate import GenerationConfig, Generator
    from owl_jax.inference.session import ChatSession

    try:
        model, processor = owl_jax.from_pretrained(
            args.checkpoint, dtype=args.dtype, quantize=args.quantize, show_progress=False
        )
    except (OSError, ValueError) as e:  # CheckpointError is a ValueError
        return _fail(f"cannot load the checkpoint {args.checkpoint}: {_one_line(e)}")
    if processor is None:
        return _fail(f"{args.checkpoint} has no tokenizer.model or tokenizer.json")
    video_layout = getattr(processor, "layout", "image") == "video"
    if args.video and not video_layout:
        return _fail(f"cannot use video {args.video[0]!r}: {args.checkpoint} is an image-layout checkpoint")
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
        eos_token_id=processor.eos_token_id,
        bos_token_id=processor.bos_token_id,
        pad_token_id=processor.pad_token_id,
        num_beams=args.num_beams,
    )
    generator = Generator(model, unstack_layers=args.unstack_layers)
    session = ChatSession(generator, processor, max_length=args.max_length, config=config, num_frames=args.num_frames)
    media = [("image", path) for path in args.image] + [("video", frames) for frames in videos]

    def answer(question: str) -> bool:
        nonlocal media
        try:
            session.ask(question, media=media, stream=lambda piece: print(piece, end="", flush=True))
            return True
        except ValueError as e:
            print(f"\nerror: {_one_line(e)}", file=sys.stderr)
            return False
        finally:
            media = []
            print(flush=True)

    if args.prompt is not None:
        return 0 if answer(args.prompt) else 1
    interactive = sys.stdin.isatty()
    if interactive:
        extra = ", /video PATH a video" if video_layout else ""
        print(
            f"Ask a question. /image PATH attaches an image{extra}, /reset starts over, /quit leaves.", file=sys.stderr
        )
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
            media = []
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
            media.append(("image", path))
            print(f"(image {path} attached to the next question)", file=sys.stderr)
        elif line.split()[0] == "/video":
            path = line[len("/video") :].strip()
            if not video_layout:
                print(
                    f"error: cannot use video {path!r}: {args.checkpoint} is an image-layout checkpoint",
                    file=sys.stderr,
                )
                failed = True
                continue
            frames, why = _read_video(path, args.num_frames) if path else (None, "no path given (/video PATH)")
            if why is not None:
                print(f"error: cannot read video {path!r}: {why}", file=sys.stderr)
                failed = True
                continue
            media.append(("video", frames))
            print(f"(video {path} attached to the next question)", file=sys.stderr)
        elif line.startswith("/"):
            commands = "/image PATH, /video PATH" if video_layout else "/image PATH"
            print(f"unknown command {line.split()[0]}; use {commands}, /reset or /quit", file=sys.stderr)
        else:
            if interactive:
                print("owl> ", end="", flush=True)
            failed = not answer(line) or failed
    return 1 if failed and not interactive else 0


if __name__ == "__main__":
    sys.exit(main())
