"""The training loop of one stage: resume, train with a progress bar, evaluate, checkpoint, stop cleanly.

`run_stage` resumes from the stage's latest complete checkpoint when there is one (train state, data
iterator position, so later losses equal those of an uninterrupted run), otherwise starts from the
parameters `init_params()` returns. SIGTERM (preemption) or Ctrl-C saves a checkpoint before exiting.
The caller's `hooks` (`owl_jax.training.hooks`) run at the end of each step and may request the same stop.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from owl_jax.data.pipeline import SKIP_REASONS, ExampleTransform, PipelineSpec, evaluation_rows, training_batches
from owl_jax.paths import as_path
from owl_jax.training.checkpoints import StageCheckpoints
from owl_jax.training.evaluation import evaluate
from owl_jax.training.flops import peak_flops, train_step_flops
from owl_jax.training.hooks import StepInfo, TrainerHooks
from owl_jax.training.metrics import MetricsWriter
from owl_jax.training.trainer import Trainer


class SkippedRecordsError(RuntimeError):
    """More unusable records than the configured threshold."""


class NonFiniteLossError(RuntimeError):
    """A stage's training loss became NaN or infinite; the run stops before that stage's model is written."""


class _StopRequest:
    """Set by SIGTERM / SIGINT; the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step boundary
        self.signal = signum
        if jax.process_index() == 0:
            print(
                f"\nsignal {signum}: saving a checkpoint at the end of this step (Ctrl-C again to abort)",
                file=sys.stderr,
            )

    def request(self, signum: int) -> None:
        """Stop at the next step boundary as if `signum` had arrived (a hook's stop request)."""
        if self.signal is None:
            self.signal = signum

    def requested(self) -> bool:
        flag = np.int32(self.signal is not None)
        if jax.process_count() > 1:  # every process must stop at the same step
            flag = multihost_utils.process_allgather(flag).max()
        return bool(flag)


STOP = _StopRequest()


@dataclasses.dataclass
class StageResult:
    params: Any  # the final parameters (device arrays)
    evaluation: dict[str, Any] | None
    steps: int


def _progress(total: int, start: int, name: str):
    if jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=name, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def run_stage(
    name: str,
    stage: Any,
    trainer: Trainer,
    *,
    workdir: str | os.PathLike,
    data_dir: str | os.PathLike,
    tokenizer: str,
    init_params: Callable[[], Any],
    special_ids: tuple[int, int] = (1, 2),
    data_cfg: Any,
    checkpoint_cfg: Any,
    log_cfg: Any,
    config_dict: dict,
    seed: int,
    eval_paths: list[str] | None = None,
    peak_flops_per_device: float = 0.0,
    hooks: TrainerHooks | None = None,
) -> StageResult:
    """Train one stage to `stage.steps` optimizer steps (resuming if possible) and evaluate it.

    `workdir` and `data_dir` may be local or remote (`gs://...`; `owl_jax.paths`): the stage writes its
    checkpoints to `workdir/name/checkpoints` and its metrics to `workdir/name/logs`.
    `tokenizer` is the tokenizer file the rows are tokenized with, `special_ids` its BOS and EOS ids.
    `hooks.step_end` runs after each step once its checkpoint save has started (see `owl_jax.training.hooks`).
    """
    stage_dir = as_path(workdir) / name
    cfg = trainer.model_cfg
    ckpt = StageCheckpoints(
        stage_dir / "checkpoints",
        every=checkpoint_cfg.every,
        keep=checkpoint_cfg.keep,
        async_save=checkpoint_cfg.async_save,
    )
    restored = ckpt.restore_latest(trainer.abstract_state)  # the newest intact checkpoint (see checkpoints.py)
    data_state = None
    if restored is not None:
        state, data_state = restored.state, restored.data
    else:
        state = trainer.init_state(init_params(), seed)
    start = int(state.step)

    max_images = stage.data.max_images or data_cfg.max_images
    spec = PipelineSpec(
        seq_len=data_cfg.seq_len,
        max_images=max_images,
        image_size=cfg.vision.image_size,
        image_tokens=cfg.image_tokens,
        augment=data_cfg.augment,
        drop_images=stage.data.drop_images,
        tokenization=data_cfg.get("tokenization", "released"),
        bos_id=special_ids[0],
        eos_id=special_ids[1],
        resize="shortest_edge_crop" if cfg.video else "squash",  # as the processor of the model's layout
    )
    transform = ExampleTransform(spec, tokenizer)
    procs = jax.process_count()
    if stage.batch_size % (procs * stage.grad_accum):
        raise ValueError(
            f"{name}: batch_size {stage.batch_size} must be a multiple of processes ({procs}) × "
            f"grad_accum ({stage.grad_accum})"
        )
    sources = [[str(as_path(data_dir) / p) for p in group] for group in stage.data.sources]
    batches = training_batches(
        sources,
        transform,
        batch_size=stage.batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=procs,
    )
    iterator = iter(batches)
    if data_state:
        iterator.set_state(data_state)

    writer = MetricsWriter(stage_dir / "logs", tensorboard=log_cfg.tensorboard)
    images_per_step = stage.batch_size * max_images
    flops = train_step_flops(
        cfg,
        stage.kind,
        rows=stage.batch_size,
        seq_len=data_cfg.seq_len,
        images=0 if stage.data.drop_images else images_per_step,
        train_abstractor=stage.train_abstractor,
    )
    peak = peak_flops_per_device or peak_flops(jax.devices()[0].device_kind)
    skipped = np.zeros(len(SKIP_REASONS), np.int64)
    rows_seen = 0
    bar = _progress(stage.steps, start, name)
    window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
    try:
        for step in range(start, stage.steps):
            local = next(iterator)
            skipped += np.bincount(local["skipped"], minlength=len(SKIP_REASONS))[: len(SKIP_REASONS)]
            rows_seen += len(local["skipped"])
            _check_skips(skipped, rows_seen, data_cfg.max_skip_fraction, name)
            state, metrics = trainer.train_step(state, trainer.global_batch(local))
            window_steps += 1
            done = step + 1
            values = None
            if done % log_cfg.every == 0 or done == stage.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - window_start
                window_tokens += values["tokens"]
                values["answer_tokens_per_s"] = window_tokens / elapsed
                values["tokens_per_s"] = window_steps * stage.batch_size * data_cfg.seq_len / elapsed
                values["step_s"] = elapsed / window_steps
                if peak:
                    values["mfu"] = flops * window_steps / elapsed / (peak * jax.device_count())
                values["skipped_rows"] = int(skipped[1:].sum())
                writer.write(done, values)
                _check_finite_loss(name, done, values["loss"])  # before this step's checkpoint, and before export
                if bar is not None:
                    bar.set_postfix_str(
                        f"loss {values['loss']:.3f} lr {values['lr']:.2e} "
                        f"tok/s {values['tokens_per_s']:.0f} " + (f"MFU {values['mfu']:.1%}" if peak else "MFU n/a"),
                        refresh=False,
                    )
                window_start, window_tokens, window_steps = time.perf_counter(), 0.0, 0
            if bar is not None:
                bar.update(1)
            if stage.eval_every and done % stage.eval_every == 0 and done != stage.steps and eval_paths:
                result = _evaluate(trainer, state.params, eval_paths, transform, stage.batch_size, data_cfg.max_images)
                writer.write(
                    done,
                    {
                        "loss": result["loss"],
                        "overall": result["overall"],
                        **{f"accuracy/{g}": a for g, a in result["accuracy"].items()},
                    },
                    prefix="eval",
                )
            if values is None and ckpt.will_save(done):  # never checkpoint a diverged state unseen
                _check_finite_loss(name, done, float(metrics["loss"]))
            ckpt.save(done, state.checkpointed(), iterator.get_state(), config_dict)
            if hooks is not None:
                hooks.step_end(
                    StepInfo(stage=name, step=done, total_steps=stage.steps, metrics=values, _stop=STOP.request)
                )
            if STOP.requested():
                if values is None and ckpt.will_save(done, force=True):
                    _check_finite_loss(name, done, float(metrics["loss"]))
                ckpt.save(done, state.checkpointed(), iterator.get_state(), config_dict, force=True)
                ckpt.wait()
                if bar is not None:
                    bar.close()
                print(
                    f"\n{name}: stop requested (signal {STOP.signal}); saved step {done} to {ckpt.directory}",
                    file=sys.stderr,
                )
                raise SystemExit(128 + (STOP.signal or 15))
        if ckpt.latest_step() != stage.steps:
            ckpt.save(stage.steps, state.checkpointed(), iterator.get_state(), config_dict, force=True)
        ckpt.wait()
    except BaseException:
        try:  # let a save in flight finish (it is complete or discarded, never half-visible)
            ckpt.wait()
        finally:
            raise
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    evaluation = None
    if eval_paths:
        evaluation = _evaluate(trainer, state.params, eval_paths, transform, stage.batch_size, data_cfg.max_images)
        writer = MetricsWriter(stage_dir / "logs", tensorboard=log_cfg.tensorboard)
        writer.write(
            stage.steps,
            {
                "loss": evaluation["loss"],
                "overall": evaluation["overall"],
                **{f"accuracy/{g}": a for g, a in evaluation["accuracy"].items()},
            },
            prefix="eval",
        )
        writer.close()
    ckpt.close()
    return StageResult(state.params, evaluation, stage.steps)


def _evaluate(
    trainer: Trainer, params: Any, paths: list[str], transform: ExampleTransform, batch_size: int, max_images: int
):
    eval_transform = ExampleTransform(
        dataclasses.replace(transform.spec, augment=False, drop_images=False, max_images=max_images),
        transform.tokenizer_path,
    )
    batches, examples = evaluation_rows(paths, eval_transform, batch_size=batch_size)
    return evaluate(trainer, params, batches, examples)


def _check_finite_loss(name: str, step: int, loss: float) -> None:
    """Stop the run when the loss is NaN or infinite. Checked where metrics are fetched anyway (every
    `log.every` steps and at the stage's last step, so always before its final save and export), and before
    every checkpoint save, so a diverged state never pushes the last finite checkpoints out of `keep`."""
    if not np.isfinite(loss):
        raise NonFiniteLossError(
            f"{name} step {step}: loss is {loss}; stopping before export — lower stages.{name}.optim.lr or check "
            "the data (the checkpoints of earlier steps are kept)"
        )


def _check_skips(skipped: np.ndarray, rows: int, max_fraction: float, name: str) -> None:
    bad = int(skipped[1:].sum())
    if rows >= 100 and bad > max_fraction * rows:
        reasons = ", ".join(f"{SKIP_REASONS[i]}: {int(n)}" for i, n in enumerate(skipped) if i and n)
        raise SkippedRecordsError(
            f"{name}: {bad} of {rows} rows were unusable ({reasons}), more than "
            f"max_skip_fraction={max_fraction}; fix the data or raise the threshold"
        )
