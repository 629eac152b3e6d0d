"""`owl-chat`: chat with a checkpoint in the terminal.

    owl-chat --checkpoint DIR [--image a.jpg ...] [--prompt "..."]

Without `--prompt` it is an interactive session (answers stream in as they are decoded; the KV cache is
kept between turns). Commands: `/image PATH` attaches an image to the next question, `/reset` starts a new
conversation, `/quit` (or end of input) leaves. With `--prompt` it answers once and exits.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="owl-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="HF-layout or converted folder with tokenizer.model")
    p.add_argument("--image", action="append", default=[], help="image for the first question (repeatable)")
    p.add_argument("--prompt", default=None, help="answer this one question and exit")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-length", type=int, default=2048, help="positions for the whole conversation")
    p.add_argument(
        "--unstack-layers",
        action="store_true",
        help="decode from one weight buffer per LLM layer (faster on a GPU; the LLM layers' memory twice)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint and chat (or answer `--prompt` once); returns the exit status."""
    args = _parser().parse_args(argv)
    import owl_jax
    from owl_jax.inference.generate import GenerationConfig, Generator
    from owl_jax.inference.session import ChatSession

    model, processor = owl_jax.from_pretrained(args.checkpoint, dtype=args.dtype, show_progress=False)
    if processor is None:
        print(f"error: {args.checkpoint} has no tokenizer.model", file=sys.stderr)
        return 2
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

    def answer(question: str) -> None:
        nonlocal images
        try:
            session.ask(question, images, stream=lambda piece: print(piece, end="", flush=True))
        except ValueError as e:
            print(f"\nerror: {e}", file=sys.stderr)
        finally:
            images = []
        print(flush=True)

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask a question. /image PATH attaches an image, /reset starts over, /quit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            images = []
            print("(new conversation)", file=sys.stderr)
        elif line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                processor.load_image(path)
            except (ValueError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            images.append(path)
            print(f"(image {path} attached to the next question)", file=sys.stderr)
        elif line.startswith("/"):
            print(f"unknown command {line.split()[0]}; use /image PATH, /reset or /quit", file=sys.stderr)
        else:
            if interactive:
                print("owl> ", end="", flush=True)
            answer(line)


if __name__ == "__main__":
    sys.exit(main())
