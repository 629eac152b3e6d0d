"""`owl-serve --checkpoint DIR` (or `python -m owl_jax.serve`): serve a checkpoint over HTTP (OpenAI chat API
+ a chat page).

Binds to 127.0.0.1 unless --host says otherwise: the server has no authentication, so exposing it on a
network lets anyone there use the model (and, with --allow-local-files, read images from this machine).
Image and video URLs over http(s) are fetched only from the hosts named by --allow-url-host.

--slots N decodes up to N requests at once in one batch (default 16; 0 runs one request at a time, and
gives no logprobs); --decode-steps K runs K decode steps per device call once half the slots are busy
(default 4; fewer busy slots run one). --quantize int8|int4 loads the language model's weights quantized.

SIGTERM or Ctrl-C stops it gracefully: no new connections; requests in flight get --shutdown-grace seconds
to finish, then are cancelled (a stream ends with an error event and `data: [DONE]`, any other request gets
a 503); a second signal cancels at once. Exit status: 0 after a shutdown, 1 when the address cannot be
bound (`cannot listen on HOST:PORT: ...`), 2 for bad arguments or a checkpoint that cannot be loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from owl_jax.quant.spec import add_quantize_argument


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not an integer") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value}: must be 0 to 65535")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _positive_number(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="owl-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint", required=True, help="HF-layout or converted folder with tokenizer.model or tokenizer.json"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (0: any free port)")
    p.add_argument("--model-name", default=None, help="model id for the API (default: the checkpoint folder's name)")
    p.add_argument(
        "--allow-local-files",
        action="store_true",
        help="let image_url and video_url name files on this machine (file:// URLs or paths)",
    )
    p.add_argument(
        "--allow-url-host",
        action="append",
        default=[],
        metavar="HOST",
        help="fetch http(s) image and video URLs from HOST (or HOST:PORT); repeatable; none by default",
    )
    p.add_argument(
        "--url-timeout", type=_positive_number, default=10.0, help="seconds a URL fetch may take (default 10)"
    )
    p.add_argument(
        "--num-frames", type=int, default=4, help="frames sampled from each video (video checkpoints; default 4)"
    )
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MiB (default 20)")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="images with more pixels are refused before decoding (default: the processor's, ~89.5M)",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=512, help="default and largest max_tokens of a request (default 512)"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    add_quantize_argument(p)
    p.add_argument(
        "--slots",
        type=int,
        default=16,
        help="requests decoded at once in one batch (default 16; 0: one request at a time, no logprobs)",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=4,
        help="decode steps per device call with --slots once half the slots are busy (default 4; fewer "
        "busy slots run one step per call; more: less host work per token, admissions wait longer; "
        "docs/serving.md)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections beyond this get a 503 (default 512)",
    )
    p.add_argument(
        "--backlog", type=int, default=128, help="connections the OS queues before the server accepts them (128)"
    )
    p.add_argument(
        "--shutdown-grace",
        type=_non_negative,
        default=5.0,
        help="seconds requests in flight get to finish on SIGTERM or Ctrl-C before they are cancelled (5)",
    )
    p.add_argument(
        "--unstack-layers",
        action="store_true",
        help="decode from one weight buffer per LLM layer (faster on a GPU; the LLM layers' memory twice)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint and serve until SIGTERM or Ctrl-C; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.num_frames < 2:
        print(f"error: --num-frames must be at least 2, got {args.num_frames}", file=sys.stderr)
        return 2
    if (
        args.max_body_mb <= 0
        or args.max_new_tokens < 1
        or (args.max_image_pixels or 1) < 1
        or args.backlog < 1
        or args.max_connections < 1
    ):
        print(
            "error: --max-body-mb, --max-new-tokens, --max-image-pixels, --backlog and --max-connections must be "
            "positive",
            file=sys.stderr,
        )
        return 2
    if args.slots < 0:
        print(f"error: --slots must be 0 (one request at a time) or more, got {args.slots}", file=sys.stderr)
        return 2
    if args.decode_steps < 1:
        print(f"error: --decode-steps must be at least 1, got {args.decode_steps}", file=sys.stderr)
        return 2
    try:
        from owl_jax.serve.fetch import parse_allow_list

        parse_allow_list(args.allow_url_host)
    except ValueError as e:
        print(f"error: --allow-url-host: {e}", file=sys.stderr)
        return 2
    import signal
    import threading

    reason = _cannot_bind(args.host, args.port)  # before the slow model load; the real bind comes later
    if reason is not None:
        print(f"error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    try:
        import owl_jax
        from owl_jax.inference.generate import Generator
        from owl_jax.serve.server import make_server

        try:
            model, processor = owl_jax.from_pretrained(
                args.checkpoint, dtype=args.dtype, quantize=args.quantize, show_progress=False
            )
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError
            print(f"error: cannot load the checkpoint {args.checkpoint}: {_one_line(e)}", file=sys.stderr)
            return 2
        if processor is None:
            print(f"error: {args.checkpoint} has no tokenizer.model or tokenizer.json", file=sys.stderr)
            return 2
        name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint)) or "mplug-owl"
        try:
            server = make_server(
                model,
                processor,
                host=args.host,
                port=args.port,
                model_name=name,
                generator=Generator(model, unstack_layers=args.unstack_layers),
                allow_local_files=args.allow_local_files,
                max_body_bytes=int(args.max_body_mb * 2**20),
                max_image_pixels=args.max_image_pixels,
                max_new_tokens=args.max_new_tokens,
                backlog=args.backlog,
                num_frames=args.num_frames,
                slots=args.slots,
                decode_steps=args.decode_steps,
                allow_url_hosts=tuple(args.allow_url_host),
                url_timeout=args.url_timeout,
                max_connections=args.max_connections,
            )
        except (OSError, OverflowError) as e:
            reason = getattr(e, "strerror", None) or _one_line(e)
            print(f"error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:  # Ctrl-C while loading
        return 130
    log = logging.getLogger("owl_jax.serve")
    stopper: list[threading.Thread] = []

    def on_signal(signum: int, frame: object) -> None:
        # serve_forever returns once stop_serving() has run, which must happen off this (the serving) thread.
        if stopper:
            log.info("second %s: cancelling the requests in flight now", signal.Signals(signum).name)
            server.hurry()
            return
        log.info("%s: stopping (up to %.1f s for requests in flight)", signal.Signals(signum).name, args.shutdown_grace)
        stopper.append(threading.Thread(target=server.stop_serving, name="owl-serve-stop", daemon=True))
        stopper[0].start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving %r on %s (chat page at %s/)", name, server.url, server.url)
    try:
        server.serve_forever()
        server.drain(args.shutdown_grace)
    finally:
        server.server_close()
    log.info("stopped")
    return 0


def _cannot_bind(host: str, port: int) -> str | None:
    """Why the server could not listen on `host:port` (bound as `OwlServer` binds), or None."""
    import socket

    if port == 0:
        return None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        return e.strerror or _one_line(e)
    finally:
        sock.close()
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 500 else text[:500] + "..."


if __name__ == "__main__":
    sys.exit(main())
