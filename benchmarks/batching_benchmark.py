#!/usr/bin/env python
"""Continuous batching throughput: completion tokens/s through the batch scheduler at several concurrencies,
beside the serial worker (one `Generator.generate` per request).

    python benchmarks/batching_benchmark.py [--checkpoint DIR] [--slots 16] [--concurrency 1 4 16]
        [--new-tokens 64] [--requests 32] [--slot-length 256] [--json results.json]

Default model: the tiny reference fixture (its tokenizer decodes the streamed text, as the server does).
Each request is a text prompt of 20 to 120 random tokens (prompt buckets 64 and 128) answered with exactly
`--new-tokens` tokens (EOS masked by min_new_tokens), so every mode does the same work. At concurrency c,
c client threads share `--requests` requests, each submitting its next one once its last is answered.
Every mode first serves one request per prompt bucket untimed (its programs compile then). The table
gives, per mode and concurrency: requests, completion tokens, wall seconds, completion tokens/s and that
rate over the same mode's rate at concurrency 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FIXTURE = os.path.join(REPO, "tests", "fixtures", "mplug_owl_tiny")


def make_jobs(processor, vocab: int, count: int, new_tokens: int, seed: int):
    from owl_jax.inference.generate import GenerationConfig
    from owl_jax.serve.worker import Job

    rng = np.random.default_rng(seed)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        eos_token_id=processor.eos_token_id,
        pad_token_id=processor.pad_token_id,
        bos_token_id=processor.bos_token_id,
    )
    jobs = []
    for i in range(count):
        ids = rng.integers(3, vocab, size=int(rng.integers(20, 121))).astype(np.int32)
        ids[0] = processor.bos_token_id
        jobs.append(Job(ids[None], np.zeros((0, 3, 224, 224), np.float32), config, label=f"bench-{i}"))
    return jobs


def serve(worker, jobs, concurrency: int) -> tuple[float, int]:
    """Wall seconds and completion tokens for `jobs`, `concurrency` clients each taking the next in turn."""
    lock, queue, tokens, errors = threading.Lock(), list(jobs), [], []

    def client():
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop()
            worker.submit(job)
            while True:
                kind, value = job.events.get(timeout=600)
                if kind == "done":
                    tokens.append(value.completion_tokens)
                    break
                if kind == "error":
                    errors.append(value)
                    break

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return time.perf_counter() - start, sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(FIXTURE, "checkpoint"))
    parser.add_argument("--tokenizer", default=os.path.join(FIXTURE, "tokenizer.model"))
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--slot-length", type=int, default=256, help="KV cache columns per slot")
    parser.add_argument("--skip-serial", action="store_true", help="only the batch scheduler")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()

    import owl_jax
    from owl_jax.data.processor import OwlProcessor
    from owl_jax.inference.generate import Generator
    from owl_jax.serve.worker import make_worker

    model, _ = owl_jax.from_pretrained(args.checkpoint, show_progress=False)
    cfg = model.config
    processor = OwlProcessor(args.tokenizer, image_size=cfg.vision.image_size, image_tokens=cfg.image_tokens)
    generator = Generator(model, prompt_bucket=64, cache_bucket=128)
    modes = [("batch", args.slots)] + ([] if args.skip_serial else [("serial", 0)])
    rows = []
    for name, slots in modes:
        options = {"slot_length": args.slot_length, "prompt_buckets": (64, 128)} if slots else {}
        worker = make_worker(generator, processor.decode, slots=slots, **options)
        worker.start()
        try:
            warm = make_jobs(processor, cfg.text.vocab_size, 4, args.new_tokens, seed=1)
            warm[0].input_ids, warm[1].input_ids = warm[0].input_ids[:, :30], warm[1].input_ids[:, :100]
            serve(worker, warm, 2)
            base = None
            for c in args.concurrency:
                jobs = make_jobs(processor, cfg.text.vocab_size, max(args.requests, c), args.new_tokens, seed=c)
                seconds, tokens = serve(worker, jobs, c)
                rate = tokens / seconds
                base = base or rate
                rows.append(
                    {
                        "mode": f"{name} ({slots} slots)" if slots else name,
                        "concurrency": c,
                        "requests": len(jobs),
                        "tokens": tokens,
                        "seconds": round(seconds, 3),
                        "tokens_per_s": round(rate, 1),
                        "vs_concurrency_1": round(rate / base, 2),
                    }
                )
                print(rows[-1], file=sys.stderr, flush=True)
        finally:
            worker.stop()
    header = f"{'mode':<18} {'conc':>5} {'reqs':>5} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'vs c=1':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['mode']:<18} {r['concurrency']:>5} {r['requests']:>5} {r['tokens']:>7} {r['seconds']:>8.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['vs_concurrency_1']:>7.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
