"""Ahead-of-time compilation of the real train step for TPU topologies, on a host without TPUs.

The demo config's stage 2 (LoRA on the LLM's attention + the abstractor; ViT and LLM frozen) is compiled by the
TPU compiler for a v5e 2x2 and a v5p 2x2x1 slice, from abstract arrays only.
"""

import math
import types

import pytest

from owl_jax.aot import analysis, search, targets
from owl_jax.aot.train_plan import compile_train_step
from owl_jax.training.run import model_config

SEQ = 128  # a multiple of the splash kernel's block: LLaMA's causal training attention takes the kernel


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("libtpu", reason="libtpu (the TPU compiler, the `tpu` extra) is not installed")
    from configs import default

    config = default.get_config()
    config.data.seq_len = SEQ
    return config, model_config(config)


def compiled(demo, target: str, per_chip_batch: int, remat: str = "none"):
    config, cfg = demo
    return compile_train_step(
        config, "stage2", cfg, targets.parse_target(target), mesh_shape=(1, -1, 1),
        per_chip_batch=per_chip_batch, seq_len=SEQ, remat=remat,
    )  # fmt: skip


@pytest.fixture(scope="module")
def v5e(demo):
    return {b: compiled(demo, "v5e:2x2", b) for b in (1, 2)}


@pytest.fixture(scope="module")
def v5p(demo):
    return compiled(demo, "v5p:2x2x1", 1, remat="full")


def test_targets_name_slices_as_google_cloud_does():
    v5p, v4, v5e = (targets.parse_target(n) for n in ("v5p-256", "v4-128", "v5litepod-16"))
    assert (v5p.num_chips, v5p.topology_name) == (128, "v5:4x4x8")  # TensorCores: two per chip
    assert (v4.num_chips, v4.topology_name) == (64, "v4:4x4x4")
    assert (v5e.num_chips, v5e.topology_name) == (16, "v5e:4x4")  # chips
    two = targets.parse_target("2xv5e-256")
    assert (two.num_slices, two.num_chips) == (2, 512)
    with pytest.raises(targets.TargetError, match="valid: v4-N"):
        targets.parse_target("v5p-3")


def test_frozen_leaves_have_no_optimizer_state(v5e, v5p):
    for r in (v5e[1], v5p):
        assert r.fits and r.trainable_params < r.frozen_params
        # Adam's two moments per trainable element, a few scalars (step counts, finiteness), nothing frozen
        assert 2 * r.trainable_params <= r.opt_state_elements < 2 * r.trainable_params + 64


def test_llama_training_attention_runs_the_splash_kernel(v5e, v5p, demo):
    layers = demo[1].text.num_layers
    for r in (v5e[1], v5p):
        kernels = r.kernel_calls
        runs = 1 if r.remat == "none" else 2  # once per layer, and again where remat recomputes the layer
        assert sum(c for k, c in kernels.items() if k.startswith("splash_mha_fwd")) == layers * runs
        assert any(k.startswith("splash_mha_dq") for k in kernels)  # and its backward kernels
        assert any(k.startswith("splash_mha_dkv") for k in kernels)


def test_compiled_matmul_flops_match_the_model_count(v5e, v5p):
    # The scanned layers' bodies counted per iteration; without remat the compiled dots are the model's, and
    # with full remat the model's plus the layers' recomputed forward.
    for r in (v5e[1], v5e[2], v5p):
        assert r.flops_compiled == pytest.approx(r.flops_model_in_hlo, rel=0.02)
        assert r.flops_model_in_hlo < r.flops_model + r.flops_recompute  # the kernel's attention is the rest
        assert r.flops_xla_remat == 0  # far from the HBM limit XLA recomputes nothing of its own
    assert v5e[1].flops_recompute == 0
    assert v5p.flops_recompute > 0.15 * v5p.flops_model  # most of the LLM's forward runs again


def test_activation_memory_grows_with_the_batch(v5e):
    one, two = v5e[1].memory, v5e[2].memory
    # What the step holds beyond its arguments: per-row activations (twice as many rows) plus what does not
    # depend on the batch (gradients, optimizer updates), so it grows by more than nothing and at most 2x.
    held = [m["peak_bytes"] - m["argument_bytes"] for m in (one, two)]
    assert 1.05 < held[1] / held[0] <= 2.0
    assert two["argument_bytes"] > one["argument_bytes"]  # the batch's own arrays


def test_trip_counts_come_from_the_loops():
    text = """HloModule m

%cond (p: (s32[], f32[8,8])) -> pred[] {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8] get-tuple-element(%p), index=1
  %y = f32[8,8] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %r = f32[8,8] all-reduce(%y), replica_groups={}, to_apply=%add
  %s = (f32[8,8]{1,0:T(8,128)}, f32[8,8]{1,0}, u32[], u32[]) collective-permute-start(%r), source_target_pairs={{0,1}}
  %d = f32[8,8]{1,0:T(8,128)} collective-permute-done(%s)
  %one = s32[] constant(2)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,8]) tuple(%next, %d)
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8] parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], f32[8,8]) tuple(%zero, %x)
  %w = (s32[], f32[8,8]) while(%t), condition=%cond, body=%body
  ROOT %out = f32[8,8] get-tuple-element(%w), index=1
}
"""
    module = analysis.HloModule.parse(text)
    # i = 0, 2, 4: three iterations of an 8x8x8 product, an all-reduce and a permute of 256 bytes each
    assert analysis.matmul_flops(module) == 3 * 2 * 8**3
    assert analysis.collective_summary(module) == {"all-reduce": (3, 3 * 256), "collective-permute": (3, 3 * 256)}
    assert module.unknown_trip_counts == 0


def test_search_finds_the_largest_batch_in_few_compiles():
    # A stand-in compiler whose peak is affine in the batch, plus a step where a policy recomputes more.
    hbm, fixed, per_row = 16 * 2**30, 3 * 2**30, {"none": 700 * 2**20, "full": 90 * 2**20}
    calls = []

    def compile_at(policy, batch):
        calls.append((policy, batch))
        peak = fixed + per_row.get(policy, per_row["none"]) * batch
        memory = {"peak_bytes": peak} if peak <= 0.97 * hbm else None
        return types.SimpleNamespace(fits=memory is not None, memory=memory, hbm_bytes=hbm, per_chip_batch=batch,
                                     remat=policy, needed_bytes=0 if memory else peak)  # fmt: skip

    winner, best, attempts = search.best_remat(compile_at, policies=("none", "full"))
    largest = {p: int((0.97 * hbm - fixed) // rows) for p, rows in per_row.items()}
    assert best["full"].per_chip_batch == largest["full"] and winner is best["full"]
    assert not best["none"].fits  # less recomputation cannot hold the winner's batch: one compile says so
    assert len(attempts) == len(calls) < 12  # a row-by-row scan would take largest["full"] compiles

    calls.clear()  # stopping within 10%: a fit, and a failure at most 10% above it
    _, near, tried = search.best_remat(compile_at, policies=("full",), within=0.1)
    found, failed = near["full"].per_chip_batch, search.smallest_failure(tried, near["full"])
    assert found <= largest["full"] < failed <= found + math.ceil(0.1 * found)
    assert len(tried) <= len(attempts)

    # starting at a fit close to the HBM: one more compile, the tolerance above it, settles the search
    near_fit, tried = search.largest_batch(lambda b: compile_at("full", b), start=largest["full"] - 1, within=0.1)
    assert near_fit.per_chip_batch == largest["full"] - 1 and len(tried) == 2 and not tried[1].fits


def test_mistakes_end_in_one_line_with_status_2(capsys):
    from configs import default
    from owl_jax.aot.cli import main
    from owl_jax.cli.train import run_training

    assert main(["--config", "configs/default.py", "--target", "v9-8"]) == 2
    assert main(["--config", "configs/default.py", "--target", "v5e-4", "--mesh", "1,2"]) == 2
    config = default.get_config()
    config.aot.topology = "v5p-3"
    with pytest.raises(SystemExit) as stop:
        run_training(config)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "v9-8" in lines[0] and "--mesh" in lines[1] and "aot.topology" in lines[2]
