"""The CPU comparison's bookkeeping: how many runs it makes and times, and the batch it builds."""

import argparse
import itertools

import numpy as np
import pytest

from benchmarks import cpu_compare


def _counting_run():
    calls = itertools.count(1)
    return calls, (lambda: next(calls))


@pytest.mark.parametrize("warmup,repeats,total", [(0, 1, 1), (0, 3, 3), (1, 3, 4), (2, 5, 7)])
def test_timed_runs_warmup_then_repeats(warmup, repeats, total):
    calls, run = _counting_run()
    first, times, out = cpu_compare.timed(run, lambda x: x, warmup=warmup, repeats=repeats)
    assert out == total and next(calls) == total + 1  # the last output is the last call's
    assert len(times) == repeats
    if warmup == 0:  # the first call is itself a timed run
        assert times[0] == first
    assert all(t >= 0 for t in times)


def test_timed_together_alternates_the_timed_runs():
    calls = []

    def runner(name):
        return lambda: calls.append(name) or len(calls)

    between = []
    results = cpu_compare.timed_together(
        [(runner("a"), lambda x: x, 2, 3), (runner("b"), lambda x: x, 0, 1), (runner("c"), lambda x: x, 1, 2)],
        between=lambda: between.append(len(calls)),
    )
    # first calls and warmups in turn (b's first call is its only timed run), then one timed run each in turn
    assert calls == ["a", "a", "b", "c", "a", "c", "a", "c", "a"]
    assert [len(times) for _, times, _ in results] == [3, 1, 2]
    assert results[1][1] == [results[1][0]]  # warmup 0: the first call is the timed one
    assert [out for _, _, out in results] == [9, 3, 8]  # each keeps its own last output
    assert between == [2, 3, 4, 5, 6, 7, 8]  # before every call but the very first, and not within a warmup


def test_batch_marks_images_and_second_half_answers():
    cfg, _, shape = cpu_compare.build_config(
        argparse.Namespace(
            config="tiny", set=None, rows=None, seq_len=None, images_per_row=None, lora_rank=None, dropout=False
        )
    )
    batch = cpu_compare.make_batch(cfg, shape["rows"], shape["seq_len"], images_per_row=1)
    ids = batch["input_ids"]
    assert ids.shape == (shape["rows"], shape["seq_len"])
    assert (ids[:, 0] == cfg.text.bos_token_id).all()
    assert ((ids == -1).sum(axis=1) == cfg.image_tokens).all()
    half = shape["seq_len"] // 2
    assert batch["loss_mask"][:, : half - 1].sum() == 0 and (batch["loss_mask"][:, half - 1 :] == 1).all()
    assert batch["pixel_values"].shape[:2] == (shape["rows"], 1) and np.isfinite(batch["pixel_values"]).all()
    with pytest.raises(SystemExit, match="too short"):
        cpu_compare.make_batch(cfg, shape["rows"], 2 * cfg.image_tokens, images_per_row=1)
