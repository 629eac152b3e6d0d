"""Stage semantics of the train step: what changes, what has optimizer state, the loss edge cases."""

import jax
import numpy as np
import pytest

from helpers import OPTIM, assert_same_steps, one_device_mesh, run_steps, tiny_batch, tiny_config, tiny_params
from owl_jax import ops
from owl_jax.checkpoint import flatten, nest
from owl_jax.config import LoRAConfig
from owl_jax.ops.bits import HalfBits, from_bits
from owl_jax.training.run import adapt_params
from owl_jax.training.trainer import Trainer


def moment_paths(opt_state) -> set:
    """Parameter paths that carry Adam's first moment."""
    paths = set()
    for path, _ in jax.tree_util.tree_leaves_with_path(opt_state):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "mu" in keys:
            paths.add(tuple(keys[keys.index("mu") + 1 :]))
    return paths


def test_stage1_trains_vision_and_abstractor_only():
    cfg = tiny_config()
    trainer = Trainer(cfg, stage="stage1", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    state, before, after, losses = run_steps(trainer, nest(tiny_params(cfg)))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    frozen = {p for p in before if p[0] == "language_model"}
    assert frozen and not changed & frozen  # every LLaMA weight bit-identical
    assert changed == set(before) - frozen  # every ViT and abstractor leaf moved
    assert moment_paths(state.opt_state) == set(before) - frozen  # no moments for frozen leaves
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("train_abstractor", [True, False])
def test_stage2_trains_lora_and_optionally_the_abstractor(train_abstractor):
    cfg = tiny_config(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0))
    trainer = Trainer(
        cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10, train_abstractor=train_abstractor
    )
    params = adapt_params(tiny_params(cfg), cfg, None, seed=0)
    state, before, after, _ = run_steps(trainer, params)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    lora = {p for p in before if p[-1] in ("lora_a", "lora_b")}
    abstractor = {p for p in before if p[0] == "abstractor"}
    expected = lora | (abstractor if train_abstractor else set())
    assert lora and changed == expected
    assert moment_paths(state.opt_state) == expected


def test_merged_lora_equals_w_plus_scaled_ab(tmp_path):
    from owl_jax.checkpoint import export_checkpoint, open_tensor_file, save_converted

    cfg = tiny_config(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0))
    trainer = Trainer(cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    state, _, after, _ = run_steps(trainer, adapt_params(tiny_params(cfg), cfg, None, seed=0))
    save_converted(str(tmp_path / "trained"), after, hf_config=cfg.to_hf_config(), lora=cfg.lora)
    export_checkpoint(str(tmp_path / "trained"), str(tmp_path / "hf"), merge_lora=True, show_progress=False)
    with open_tensor_file(str(tmp_path / "hf" / "model.safetensors")) as f:
        for layer in range(cfg.text.num_layers):
            for proj in ("q_proj", "v_proj"):
                path = ("language_model", "layers", proj)
                w, a, b = (after[path + (leaf,)][layer] for leaf in ("kernel", "lora_a", "lora_b"))
                expected = (w.astype(np.float64) + 4.0 * a.astype(np.float64) @ b.astype(np.float64)).T
                got = f.get(f"language_model.model.layers.{layer}.self_attn.{proj}.weight")
                np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
                assert not np.allclose(got, w.T, atol=1e-6)  # the adapters did train


def test_batch_without_answer_tokens_gives_zero_loss_and_gradient():
    cfg = tiny_config()
    trainer = Trainer(cfg, stage="stage1", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    state = trainer.init_state(nest(tiny_params(cfg)), seed=0)
    _, metrics = trainer.train_step(state, trainer.global_batch(tiny_batch(answers=False)))
    assert float(metrics["loss"]) == 0.0 and float(metrics["tokens"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0 and float(metrics["nonfinite_steps"]) == 0


def test_frozen_weights_can_be_held_in_bfloat16():
    cfg = tiny_config()
    trainer = Trainer(cfg, stage="stage1", mesh=one_device_mesh(), optim=OPTIM, total_steps=10, frozen_dtype="bfloat16")
    state, before, after, losses = run_steps(trainer, nest(tiny_params(cfg)), steps=2)
    dtypes = {p: v.dtype for p, v in after.items()}
    assert all(dtypes[p] == np.dtype("bfloat16") for p in dtypes if p[0] == "language_model")
    assert all(dtypes[p] == np.float32 for p in dtypes if p[0] != "language_model")
    assert all(np.array_equal(before[p], after[p]) for p in before if p[0] == "language_model")
    assert all(np.isfinite(losses))


def test_gradient_accumulation_matches_one_big_batch():
    cfg = tiny_config()
    params = nest(tiny_params(cfg))
    results = []
    for accum in (1, 2):
        trainer = Trainer(cfg, stage="stage1", mesh=one_device_mesh(), optim=OPTIM, total_steps=10, grad_accum=accum)
        state = trainer.init_state(params, seed=0)
        state, metrics = trainer.train_step(state, trainer.global_batch(tiny_batch(rows=4)))
        results.append((float(metrics["loss"]), flatten(jax.device_get(state.params))))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for p, v in results[0][1].items():
        np.testing.assert_allclose(results[1][1][p], v, atol=1e-6, rtol=0)


def test_chunked_cross_entropy_gives_the_same_steps():
    """Chunks of 5 positions (the last one padded) give the losses and parameters of the full logits
    (stage 2: the gradient reaches the LoRA weights and, through the LLM, the abstractor)."""
    stage = "stage2"
    cfg = tiny_config(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0))
    params = adapt_params(tiny_params(cfg), cfg, None, seed=0)
    results = []
    for chunk in (0, 5):
        trainer = Trainer(cfg, stage=stage, mesh=one_device_mesh(), optim=OPTIM, total_steps=10, loss_chunk=chunk)
        results.append(run_steps(trainer, params))
    (_, _, full, full_losses), (_, _, chunked, chunked_losses) = results
    np.testing.assert_allclose(chunked_losses, full_losses, rtol=1e-5)
    for p in full:
        np.testing.assert_allclose(chunked[p], full[p], atol=1e-5, rtol=0, err_msg="/".join(p))


def test_right_padded_batches_take_the_causal_path_with_the_same_steps():
    """`right_padded=True` (the default) drops the padding mask for plain causal attention: on right-padded
    rows the losses and parameters equal those of the full mask; other padding is refused with a clear error."""
    cfg = tiny_config(lora=LoRAConfig(rank=2, alpha=8, dropout=0.0))
    params = adapt_params(tiny_params(cfg), cfg, None, seed=0)
    lengths = np.array([16, 11, 9, 14])

    def right_padded_batch(i):
        batch = tiny_batch(seed=i)
        batch["attention_mask"] = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
        batch["loss_mask"] *= batch["attention_mask"][:, 1:]
        return batch

    runs = [
        run_steps(
            Trainer(
                cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10, right_padded=right_padded
            ),
            params,
            batch=right_padded_batch,
        )
        for right_padded in (False, True)
    ]
    assert_same_steps(runs[1], runs[0], atol=1e-6)
    trainer = Trainer(cfg, stage="stage2", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    left = tiny_batch()
    left["attention_mask"][1, :3] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] of attention_mask are not right-padded"):
        trainer.global_batch(left)


# Each stage (without and with LoRA) and each layer layout (a scanned stack held as bit patterns, unrolled
# per-layer arrays) once: the two are independent, so the diagonal covers every branch.
@pytest.mark.parametrize("stage,scan", [("stage1", True), ("stage2", False)])
def test_prepared_frozen_kernels_give_the_same_half_precision_steps(stage, scan):
    lora = LoRAConfig(rank=2, alpha=8, dropout=0.0) if stage == "stage2" else None
    cfg = tiny_config(lora=lora).replace(dtype="bfloat16", scan_layers=scan)
    params = adapt_params(tiny_params(cfg), cfg, None, seed=0) if lora else nest(tiny_params(cfg))
    plain = Trainer(cfg, stage=stage, mesh=one_device_mesh(), optim=OPTIM, total_steps=10, prepare_frozen=False)
    prepared = Trainer(cfg, stage=stage, mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    # On by default for bf16 on the CPU; LLaMA's kernels only: gradients pass through the frozen LLM in
    # both stages, never through stage 2's frozen ViT (nothing before it trains).
    assert not plain.prepared_paths
    assert set(prepared.prepared_paths) == {
        p for p in flatten(params) if p[0] == "language_model" and p[-1] == "kernel"
    }
    run = run_steps(prepared, params)
    ref = run_steps(plain, params)
    assert ref[0].prepared is None
    assert_same_steps(run, ref, atol=1e-6)
    state, before = run[0], run[1]
    for p in prepared.prepared_paths:  # made once from the frozen kernel, and still equal to it
        kernel = flatten(state.prepared)[p]
        # Unrolled layers hold stacked kernels as per-layer arrays.
        assert kernel.per_layer == (not scan and "layers" in p)
        # Stacks for a scan are held as their uint16 bit patterns on the CPU.
        assert isinstance(kernel.w, HalfBits) == (scan and "layers" in p)
        kernel = ops.PreparedKernel(*(from_bits(a) for a in (kernel.w, kernel.w_t)))
        w = before[p].astype(jax.numpy.bfloat16)
        stack = (lambda a: np.stack([np.asarray(x) for x in a])) if kernel.per_layer else np.asarray
        np.testing.assert_array_equal(stack(kernel.w), w)
        np.testing.assert_array_equal(stack(kernel.w_t), np.swapaxes(w, -1, -2))


def test_prepared_kernels_stay_out_of_checkpoints_and_come_back_on_resume(tmp_path):
    from owl_jax.training.checkpoints import StageCheckpoints

    cfg = tiny_config().replace(dtype="bfloat16")
    trainer = Trainer(cfg, stage="stage1", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)
    assert (
        Trainer(
            cfg.replace(dtype="float32"), stage="stage1", mesh=one_device_mesh(), optim=OPTIM, total_steps=10
        ).prepared_paths
        == ()
    )  # float32 needs no transposed copies
    state = trainer.init_state(nest(tiny_params(cfg)), seed=0)
    state, _ = trainer.train_step(state, trainer.global_batch(tiny_batch(seed=0)))
    ckpt = StageCheckpoints(str(tmp_path / "ckpt"), every=1, keep=1, async_save=False)
    ckpt.save(1, state.checkpointed(), {}, {}, force=True)
    ckpt.wait()
    restored, _, _ = ckpt.restore(1, trainer.abstract_state())
    assert restored.prepared is None
    batch = trainer.global_batch(tiny_batch(seed=1))
    resumed, metrics = trainer.train_step(restored, batch)  # prepares the restored state first
    assert resumed.prepared is not None
    continued, ref_metrics = trainer.train_step(state, batch)
    assert float(metrics["loss"]) == float(ref_metrics["loss"])
    for p, v in flatten(jax.device_get(continued.params)).items():
        np.testing.assert_array_equal(np.asarray(flatten(jax.device_get(resumed.params))[p]), np.asarray(v))
