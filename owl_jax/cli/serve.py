"""`owl-serve --checkpoint DIR` (or `python -m owl_jax.serve`): serve a checkpoint over HTTP (OpenAI chat API
+ a chat page).

Binds to 127.0.0.1 unless --host says otherwise: the server has no authentication, so exposing it on a
network lets anyone there use the model (and, with --allow-local-files, read images from this machine).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="owl-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="HF-layout or converted folder with tokenizer.model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    p.add_argument("--model-name", default=None, help="model id for the API (default: the checkpoint folder's name)")
    p.add_argument(
        "--allow-local-files",
        action="store_true",
        help="let image_url name files on this machine (file:// URLs or paths)",
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
    p.add_argument(
        "--unstack-layers",
        action="store_true",
        help="decode from one weight buffer per LLM layer (faster on a GPU; the LLM layers' memory twice)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the checkpoint and serve until interrupted (Ctrl-C or SIGTERM)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.max_body_mb <= 0 or args.max_new_tokens < 1 or (args.max_image_pixels or 1) < 1:
        print("error: --max-body-mb, --max-new-tokens and --max-image-pixels must be positive", file=sys.stderr)
        return 2
    import signal
    import threading

    import owl_jax
    from owl_jax.inference.generate import Generator
    from owl_jax.serve.server import make_server

    model, processor = owl_jax.from_pretrained(args.checkpoint, dtype=args.dtype, show_progress=False)
    if processor is None:
        print(f"error: {args.checkpoint} has no tokenizer.model", file=sys.stderr)
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
        )
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    # SIGTERM (e.g. from a service manager) stops as cleanly as Ctrl-C; shutdown() must run off this thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    logging.getLogger("owl_jax.serve").info("serving %r on %s (chat page at %s/)", name, server.url, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
