"""A short run of the load test (`benchmarks/serve_load.py`) against the batching server in this process.

The full runs (`--sweep 1,4,16,32`, `--hostile 0.1 --requests 2000`) are on demand; this one keeps their
checks in the suite at a small size: concurrent greedy answers equal the same prompts served alone, and a
mix of well-formed, hostile and disconnecting clients gets no 5xx and leaves the server answering.
"""

import pytest

from benchmarks import _serve_modes as modes
from helpers import served_fixture, serving
from owl_jax.serve import make_server

pytestmark = pytest.mark.hostile
PROMPTS = 6  # the first fixed prompts: text only, one image and two images among them
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, processor, _ = served_fixture(tmp_path_factory)
    with serving(make_server(model, processor, port=0, max_new_tokens=MAX_TOKENS, slots=4)) as srv:
        yield srv


def test_concurrent_answers_equal_the_solo_ones(server):
    host, port = server.server_address[:2]
    summary = modes.run_sweep(host, port, [1, 4], max_tokens=MAX_TOKENS, requests=8, timeout=60, prompts=PROMPTS)
    for level in summary["levels"]:
        assert level["requests"] == 8, level
        assert level["errors"] == 0 and level["differ_from_solo"] == 0, level
        assert level["tokens_per_s"] > 0, level


def test_a_hostile_mix_gets_no_5xx_and_every_good_request_its_answer(server):
    host, port = server.server_address[:2]
    summary = modes.run_mixed(
        host, port, requests=40, concurrency=8, hostile=0.25, max_tokens=MAX_TOKENS, timeout=60, prompts=PROMPTS
    )
    assert summary["well_formed"] == 30 and len(summary["kinds"]) == 9, summary["kinds"]  # all 8 hostile kinds
    failed = {name: ok for name, ok in summary["checks"].items() if ok is False}
    assert not failed, (failed, summary)
    assert summary["status_counts"].get("200", 0) >= summary["well_formed"], summary["status_counts"]
