"""Stage 2, joint instruction tuning (paper, appendix): ViT frozen, LoRA on the LLM's attention + the abstractor
train. LoRA goes on LLaMA's q/v projections, or on BLOOM's fused `query_key_value` (BLOOMZ checkpoints).

Text-only (Alpaca, ShareGPT/Vicuna, Baize) and multimodal (LLaVA-Instruct 150k) data, half and half per
step; 2k steps of 256 (128 + 128), AdamW lr 2e-5 cosine, warmup 50, β (0.9, 0.999), ε 1e-6, weight decay
1e-4, clip 1.0, max length 1024, bf16; LoRA r 8, alpha 32, dropout 0.05. The released script froze the
abstractor; the paper trains it (`--config.stages.stage2.train_abstractor=False` for the former).

    python train.py --config configs/stage2_instruct.py --config.model.checkpoint=MPLUG_OWL_PT_DIR \\
        --config.data.dir=DATA_DIR

The LoRA targets follow the checkpoint's text model (`--config.stages.stage2.lora.targets_by_model.bloom=...`
changes BLOOM's; `--config.stages.stage2.lora.targets=...` sets one pattern for every model).
"""

from owl_jax.training.schema import base_config, lora_config, optim_config, stage_config


def get_config():
    c = base_config()
    c.workdir = "runs/stage2_instruct"
    c.model.update(init="checkpoint", checkpoint="", dtype="bfloat16", remat_policy="full")
    c.data.update(seq_len=1024, max_images=1, augment=True, eval=())
    c.stages.stage2 = stage_config(
        "stage2",
        steps=2000,
        batch_size=256,
        sources=[["text"], ["multimodal"]],
        frozen_dtype="bfloat16",
        lora=lora_config(
            rank=8,
            alpha=32,
            dropout=0.05,
            # the released recipe's q/v for LLaMA; its pattern matches nothing in BLOOM, which fuses q, k, v
            targets_by_model={
                "llama": r".*language_model.*\.(q_proj|v_proj)",
                "bloom": r".*language_model.*\.query_key_value",
            },
        ),
        train_abstractor=True,
        optim=optim_config(lr=2e-5, warmup_steps=50, b1=0.9, b2=0.999, eps=1e-6, weight_decay=1e-4, clip_norm=1.0),
    )
    c.run = "stage2"
    c.checkpoint.update(every=250, keep=3)
    return c
