"""Serving plans compiled ahead of time for a 4-chip TPU v5e topology with the TPU compiler (`libtpu`), no TPU.

The tiny model's prefill and decode steps on a `fsdp 2 × tensor 2` mesh: the batch splits over two chips
and the key/value heads over two, so each chip holds a quarter of the KV cache.
"""

import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu")

from helpers import FIXTURE  # noqa: E402
from owl_jax.aot.serving import compile_serving, format_serving  # noqa: E402
from owl_jax.aot.targets import parse_target  # noqa: E402
from owl_jax.config import OwlConfig  # noqa: E402
from owl_jax.sharding import make_mesh  # noqa: E402

CONTEXT, NEW_TOKENS = 128, 32


@pytest.fixture(scope="module")
def cfg():
    return OwlConfig.from_hf_config(FIXTURE / "checkpoint", dtype="bfloat16", param_dtype="bfloat16")


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(1, 2, 2, devices=parse_target("v5e:2x2").devices())


@pytest.fixture(scope="module")
def reports(cfg, mesh):
    return {b: compile_serving(cfg, mesh, batch=b, context=CONTEXT, new_tokens=NEW_TOKENS) for b in (2, 4)}


def test_kv_cache_per_chip_is_what_the_compiled_decode_step_updates(cfg, reports):
    t = cfg.text
    for batch, report in reports.items():
        # keys and values, every layer, half the rows and half the heads per chip, bf16
        expected = 2 * t.num_layers * (batch // 2) * (t.num_kv_heads // 2) * CONTEXT * t.head_dim * 2
        assert report.kv_cache_bytes == expected
        assert abs(report.kv_cache_compiled_bytes - expected) <= 0.01 * expected, (batch, report.decode.memory)
        assert report.prefill.memory["output_bytes"] >= expected  # the prefill returns the filled cache
        assert report.prompt == CONTEXT - NEW_TOKENS and report.device_kind.startswith("TPU v5")


def test_doubling_the_batch_doubles_the_kv_cache(reports):
    small, large = reports[2], reports[4]
    assert large.kv_cache_bytes == 2 * small.kv_cache_bytes
    assert large.kv_cache_compiled_bytes == 2 * small.kv_cache_compiled_bytes
    assert large.param_bytes == small.param_bytes
    assert large.prefill.compiled_flops == pytest.approx(2 * small.prefill.compiled_flops, rel=0.01)


def test_prefill_flops_from_shapes_are_the_compiled_programs(reports):
    for report in reports.values():  # every prefill product is a dot of the compiled per-chip program
        assert report.prefill.flops == pytest.approx(report.prefill.compiled_flops, rel=0.02)


def test_format_says_whether_the_plan_fits(reports):
    report = reports[2]
    assert "| fits | yes" in format_serving(report, hbm_bytes=2**34)
    assert "| fits | no" in format_serving(report, hbm_bytes=report.serving_peak_bytes - 1)
    table = format_serving(report, hbm_bytes_per_s=1e9)
    step_ms = (report.decode_weight_bytes + report.kv_cache_bytes) / 1e9 * 1e3
    assert f"{step_ms:.2f} ms" in table


def test_a_prompt_with_no_room_is_refused(cfg, mesh):
    with pytest.raises(ValueError, match="longer than its"):
        compile_serving(cfg, mesh, batch=2, context=CONTEXT, new_tokens=CONTEXT - cfg.image_tokens)
