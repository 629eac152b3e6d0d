"""The embedded default: a small mPLUG-Owl trained through both stages on generated data, on a CPU.

The data (rendered shapes with captions, single-, two-image and multi-turn questions, text-only
instructions) is generated into `<workdir>/data` and prepared into ArrayRecord shards like any real
source. There is no pretrained LLaMA small enough here, so the run first trains its small LLM on the
conversations' text (`text_pretrain`, standing in for LLaMA pretraining), then stage 1 (ViT + abstractor
on captions, LLM frozen) and stage 2 (LoRA on the LLM's attention + abstractor, ViT frozen, a quarter
text-only and three quarters multimodal rows per step). Augmentation is off: the questions ask about
left/right and counts, which flips and crops change.
"""

from owl_jax.config import AbstractorConfig, OwlConfig, TextConfig, VisionConfig
from owl_jax.training.schema import base_config, lora_config, optim_config, stage_config


def model() -> OwlConfig:
    return OwlConfig(
        vision=VisionConfig(
            hidden_size=96, intermediate_size=192, num_layers=3, num_heads=4, image_size=64, patch_size=8
        ),
        abstractor=AbstractorConfig(
            hidden_size=96,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            encoder_hidden_size=96,
            attention_dropout=0.0,
        ),
        text=TextConfig(
            vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4, num_kv_heads=4
        ),
        num_query_tokens=8,
    ).validate()


def get_config():
    c = base_config()
    c.workdir = "runs/demo"
    c.model.init = "random"
    c.model.arch = model().to_hf_config()
    c.synthetic.enabled = True
    c.data.update(seq_len=96, max_images=2, augment=False, eval=("eval",), tokenization="prompt", generate_answers=True)
    c.checkpoint.update(every=100, keep=2)
    c.log.every = 10
    c.stages.llm_warmup = stage_config(
        "text_pretrain",
        steps=300,
        batch_size=16,
        sources=[["instruct_text"], ["captions", "instruct_multimodal"]],
        optim=optim_config(lr=3e-3, warmup_steps=30, b2=0.98, weight_decay=0.01),
    )
    c.stages.stage1 = stage_config(
        "stage1",
        steps=1200,
        batch_size=16,
        sources=[["captions"]],
        max_images=1,
        optim=optim_config(lr=1e-3, warmup_steps=30, b2=0.98, weight_decay=0.01),
    )
    c.stages.stage2 = stage_config(
        "stage2",
        steps=1500,
        batch_size=16,
        sources=[["instruct_text"]] + [["instruct_multimodal"]] * 3,
        lora=lora_config(
            rank=8,
            alpha=32,
            dropout=0.0,
            # every attention projection, named per text model: BLOOM fuses q, k, v into query_key_value
            targets_by_model={
                "llama": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                "bloom": r".*language_model.*\.(query_key_value|dense)",
            },
        ),
        train_abstractor=True,
        optim=optim_config(lr=4e-3, warmup_steps=30, weight_decay=1e-4),
    )
    c.run = "llm_warmup,stage1,stage2"
    return c
