"""The training configuration schema (ml_collections), shared by every file in `configs/`.

A run trains the stages named in `run` (comma-separated) in order; each stage starts from the previous
stage's parameters, the first from `model` (random, a checkpoint folder, or CLIP + LLaMA towers). Paths of
datasets are relative to `data.dir` (default `<workdir>/data`). Every field can be overridden on the
command line: `python train.py --config configs/x.py --config.stages.stage2.steps=100`.

`owl_jax.training.validation` checks a whole config against this schema before any work.
"""

from __future__ import annotations

from ml_collections import ConfigDict

# What a stage's `kind` may be (`owl_jax.training.optimizer.trainable` says what trains in each).
STAGE_KINDS = ("stage1", "stage2", "stage2_full", "text_pretrain", "joint_pretrain")
MODEL_INITS = ("random", "checkpoint", "towers")
PREPARE_FROZEN = ("auto", "on", "off")
QUANTIZE = ("", "int8", "int4")
# Stages that may run over a quantized language model: they never train its linear weights.
QUANTIZED_STAGES = ("stage1", "stage2")


def optim_config(**overrides) -> ConfigDict:
    c = ConfigDict(
        dict(lr=1e-4, end_lr=0.0, warmup_steps=100, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, clip_norm=1.0)
    )
    c.update(overrides)
    return c


# LoRA targets by text model (`TextConfig.model_type`): the released recipe's q/v projections for LLaMA; the
# fused `query_key_value` for BLOOM, where `q_proj|v_proj` matches nothing. Both keep `language_model` in
# the pattern: the ViT has `query_key_value` modules too.
LORA_TARGETS = {
    "llama": r".*language_model.*\.(q_proj|v_proj)",
    "bloom": r".*language_model.*\.query_key_value",
}
BY_TEXT_MODEL = "auto"  # `lora.targets` value: take the pattern from `lora.targets_by_model`


def lora_config(
    rank: int = 0,
    alpha: float = 32.0,
    dropout: float = 0.05,
    targets: str | tuple[str, ...] = BY_TEXT_MODEL,
    targets_by_model: dict[str, str | tuple[str, ...]] | None = None,
) -> ConfigDict:
    """A stage's adapters; rank 0 means none.

    Args:
      targets: the modules that get adapters, whatever the text model: one regular expression matched
        against each whole HF module name, or a tuple of name suffixes (peft's `target_modules`). "auto"
        (the default) takes them from `targets_by_model` by the model's `text.model_type`.
      targets_by_model: `{model_type: targets}`, over `LORA_TARGETS` (which gives the types it leaves out).
    """
    by_model = ConfigDict({**LORA_TARGETS, **(targets_by_model or {})})
    return ConfigDict(dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, targets_by_model=by_model))


def stage_config(
    kind: str,
    *,
    steps: int,
    batch_size: int,
    sources,
    optim: ConfigDict,
    grad_accum: int = 1,
    train_abstractor: bool = True,
    frozen_dtype: str = "",
    lora: ConfigDict | None = None,
    drop_images: bool = False,
    max_images: int = 0,
    eval_every: int = 0,
    loss_chunk: int = 256,
    prepare_frozen: str = "auto",
    start_from: str = "",
) -> ConfigDict:
    """One stage.

    Args:
      kind: "stage1", "stage2", "stage2_full" or "text_pretrain" (what trains; see `optimizer.trainable`).
      batch_size: global rows per optimizer step (all processes, all accumulation micro-batches).
      sources: datasets (prepared prefixes) to mix in equal parts, each a list of prefixes read as one
        (stored as tuples: ml_collections overrides tuples from the command line, not lists).
      frozen_dtype: hold frozen parameters in this dtype (e.g. "bfloat16"); "" keeps them as loaded.
      drop_images: train on the conversations' text only.
      max_images: image slots per row in this stage (0: `data.max_images`); captions need one.
      loss_chunk: sequence positions per chunk of the cross-entropy (0: the whole batch's logits at once);
        chunks cut the step's temporaries (4 x 512 tokens, vocab 32000: 939 MiB unchunked, 473 MiB with 256,
        347 MiB with 128) and were no slower.
      prepare_frozen: "auto", "on" or "off": hold the frozen kernels that gradients pass through also in
        the compute dtype with transposed copies, made once per run (see `Trainer`); "auto" does it for
        bf16/fp16 compute on CPUs.
      start_from: the stage (earlier in `run`) whose final parameters this stage starts from; "" (the
        default) takes the previous stage's, or the model's for the first stage. Variants of a stage can
        so share the stages before them (configs/ablation.py).
    """
    return ConfigDict(
        dict(
            kind=kind,
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            train_abstractor=train_abstractor,
            frozen_dtype=frozen_dtype,
            loss_chunk=loss_chunk,
            prepare_frozen=prepare_frozen,
            start_from=start_from,
            lora=lora if lora is not None else lora_config(),
            optim=optim,
            eval_every=eval_every,
            data=ConfigDict(
                dict(sources=tuple(tuple(group) for group in sources), drop_images=drop_images, max_images=max_images)
            ),
        )
    )


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.workdir = "runs/owl"
    c.seed = 0
    c.run = ""
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.model = ConfigDict(
        dict(
            init="checkpoint",  # "checkpoint" (HF or converted folder) | "towers" (CLIP + LLaMA) | "random" (arch)
            checkpoint="",
            clip="",
            llama="",
            num_query_tokens=64,
            arch=ConfigDict(),  # MplugOwlConfig-layout dict, for init="random"
            dtype="float32",
            param_dtype="float32",
            scan_layers=True,
            remat_policy="none",
            attention_impl="auto",
            # "int8" or "int4": hold the language model's linear weights quantized (owl_jax.quant). Only
            # stages that leave them frozen may run: stage1, and stage2, whose adapters then train as QLoRA.
            quantize="",
        )
    )
    # A tokenizer.model (LLaMA), a tokenizer.json (BLOOM) or a folder holding one; "" takes the one beside
    # model.checkpoint (model.llama for towers), and the demo tokenizer only for a random LLaMA.
    c.tokenizer = ""
    # tokenization: "released" trains every answer as the released training code tokenized it; "prompt"
    # trains the last answer after its context encoded as inference encodes prompts (data/conversation.py).
    # generate_answers: after each stage, also score the answers its saved model generates to the `eval`
    # sets' questions (owl_jax.training.answers); single-process runs only.
    c.data = ConfigDict(
        dict(
            dir="",
            seq_len=512,
            max_images=1,
            augment=True,
            max_skip_fraction=0.01,
            eval=(),
            tokenization="released",
            generate_answers=False,
        )
    )
    c.synthetic = ConfigDict(
        dict(enabled=False, seed=0, image_size=64, n_captions=2000, n_multimodal=3000, n_text=1000, n_eval_per_type=100)
    )
    c.stages = ConfigDict()
    c.checkpoint = ConfigDict(dict(every=500, keep=3, async_save=True))
    c.log = ConfigDict(dict(every=10, tensorboard=True))
    c.peak_flops = 0.0  # per device; 0 picks a known value for the device kind (none on CPU)
    # Compile the run's steps for a TPU target instead of training (owl_jax.aot): topology names it (v5p-256,
    # v5e-256, 2xv5e-256, v5e:2x2, ...); model an architecture (7b, tiny, a .py file; "": the config's);
    # per_chip_batch 0 takes the stage's batch_size over the data-parallel chips; search finds the largest
    # per-chip batch and remat policy; save writes the compiled step, json the reports.
    c.aot = ConfigDict(dict(topology="", model="", per_chip_batch=0, search=False, save="", json=""))
    return c
