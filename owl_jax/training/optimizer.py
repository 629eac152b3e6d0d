"""Which parameters train in each stage, and the optimizer that freezes the rest.

Freezing is an optimizer decision expressed as labels: every parameter gets "train" or "frozen" from its
path and type, and `optax.multi_transform` sends "frozen" leaves to `optax.set_to_zero()` (no optimizer
state at all) and "train" leaves to clipped AdamW. `optax.masked` alone would not do: leaves outside its
mask pass their raw gradient through. Weight decay reads parameters, so its mask also excludes frozen
leaves (and biases and norms). The whole update is wrapped in `optax.apply_if_finite`, which skips and
counts steps whose gradients are not finite.

Stages:
- `stage1`: ViT + abstractor (queries included) train, LLaMA frozen (paper, multimodal pre-training);
- `stage2`: LoRA adapters train (+ the abstractor when `train_abstractor`), everything else frozen;
- `stage2_full`: the LLaMA weights train (+ the abstractor when `train_abstractor`), the ViT frozen;
- `text_pretrain`: only the LLaMA weights train;
- `joint_pretrain`: every tower trains (no adapters): for a model without pretrained towers, a stand-in for
  the pretrained CLIP and LLaMA that stage 1 starts from.

A quantized model's integers and scales (`owl_jax.quant`: `qvalue`, `qscale`) never train, whatever the
stage: over a quantized language model, stage 2's adapters train as in QLoRA.

The language model is LLaMA or BLOOM alike (`language_model`, its tied embedding included). In the video
layout, the parameters only videos use (`VIDEO_ONLY`: the ViT's temporal modules, the temporal queries and
their projection) train only with `train_temporal`: training batches hold images, which skip them, so they
would get no gradient, and weight decay alone would shrink them.
"""

from __future__ import annotations

from typing import Any

import optax

from owl_jax.quant.spec import QUANT_LEAVES
from owl_jax.training.schema import STAGE_KINDS

STAGES = STAGE_KINDS
TRAIN, FROZEN = "train", "frozen"
LORA_LEAVES = ("lora_a", "lora_b")
NO_DECAY_LEAVES = ("bias", "scale")  # biases and every norm's scale
# Path prefixes of the video layout's parameters that only videos (two frames or more) use.
VIDEO_ONLY = (
    ("vision_model", "layers", "temporal"),
    ("abstractor", "temporal_query_tokens"),
    ("abstractor", "temporal_visual_fc"),
)

Path = tuple[str, ...]


def video_only(path: Path) -> bool:
    """Whether the parameter at `path` is one only videos use (`VIDEO_ONLY`)."""
    return any(path[: len(prefix)] == prefix for prefix in VIDEO_ONLY)


def trainable(path: Path, stage: str, *, train_abstractor: bool = True, train_temporal: bool = False) -> bool:
    """Whether the parameter at `path` (e.g. `("language_model", "layers", "q_proj", "lora_a")`) trains."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    if video_only(path) and not train_temporal:
        return False
    if path[-1] in QUANT_LEAVES:  # quantized kernels are frozen integers and their scales
        return False
    tower, is_lora = path[0], path[-1] in LORA_LEAVES
    if stage == "text_pretrain":
        return tower == "language_model" and not is_lora
    if stage == "joint_pretrain":
        return not is_lora
    if stage == "stage1":
        return tower in ("vision_model", "abstractor") and not is_lora
    if tower == "abstractor" and not is_lora:
        return train_abstractor
    if stage == "stage2":
        return is_lora
    return tower == "language_model" and not is_lora  # stage2_full


def labels_for(
    paths: list[Path], stage: str, *, train_abstractor: bool = True, train_temporal: bool = False
) -> dict[Path, str]:
    """`{path: "train" | "frozen"}` (see `trainable`); `ValueError` when nothing would train."""
    flags = dict(train_abstractor=train_abstractor, train_temporal=train_temporal)
    labels = {p: TRAIN if trainable(p, stage, **flags) else FROZEN for p in paths}
    if stage == "stage2" and not any(p[-1] in LORA_LEAVES for p in paths):
        raise ValueError("stage2 trains LoRA adapters but the model has none: set the stage's lora config")
    if TRAIN not in labels.values():
        raise ValueError(f"stage {stage!r} leaves nothing to train in this model")
    return labels


def decay_mask(labels: dict[Path, str]) -> dict[Path, bool]:
    """Decay trainable matrices only: not frozen leaves, biases or norm scales."""
    return {p: label == TRAIN and p[-1] not in NO_DECAY_LEAVES for p, label in labels.items()}


def learning_rate_schedule(peak: float, *, warmup_steps: int, total_steps: int, end_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then cosine decay to `end_lr` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(warmup_steps, 1), max(total_steps, warmup_steps + 1), end_value=end_lr
    )


def make_optimizer(
    labels: Any,
    decay: Any,
    *,
    schedule: optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    max_consecutive_nonfinite: int = 5,
) -> optax.GradientTransformation:
    """Clipped AdamW on the "train" leaves, nothing on the "frozen" ones, non-finite steps skipped.

    Args:
      labels: a tree like the parameters with "train"/"frozen" leaves.
      decay: a tree like the parameters with booleans: which leaves take weight decay.
      max_consecutive_nonfinite: after this many non-finite steps in a row the update is applied anyway
        (and the parameters become non-finite), so a diverged run fails loudly instead of idling.
    """
    chain = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay))
    inner = optax.multi_transform({TRAIN: optax.chain(*chain), FROZEN: optax.set_to_zero()}, labels)
    return optax.apply_if_finite(inner, max_consecutive_errors=max_consecutive_nonfinite)
