"""A seconds-long two-stage run for tests: a tiny random model on a little generated data."""

from owl_jax.config import AbstractorConfig, OwlConfig, TextConfig, VisionConfig
from owl_jax.training.schema import base_config, lora_config, optim_config, stage_config


def get_config():
    c = base_config()
    c.workdir = "runs/tiny"
    c.model.init = "random"
    c.model.arch = OwlConfig(
        vision=VisionConfig(
            hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, image_size=32, patch_size=16
        ),
        abstractor=AbstractorConfig(
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=2,
            encoder_hidden_size=32,
            attention_dropout=0.0,
        ),
        text=TextConfig(
            vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2
        ),
        num_query_tokens=2,
    ).to_hf_config()
    c.synthetic.update(enabled=True, image_size=32, n_captions=48, n_multimodal=48, n_text=24, n_eval_per_type=2)
    c.data.update(seq_len=96, max_images=2, augment=False, eval=("eval",))
    c.checkpoint.update(every=2, keep=5)
    c.log.update(every=1, tensorboard=True)
    c.stages.stage1 = stage_config(
        "stage1",
        steps=6,
        batch_size=8,
        sources=[["captions"]],
        optim=optim_config(lr=1e-3, warmup_steps=2, weight_decay=0.01),
    )
    c.stages.stage2 = stage_config(
        "stage2",
        steps=4,
        batch_size=8,
        sources=[["instruct_text"], ["instruct_multimodal"]],
        lora=lora_config(rank=4, alpha=8, dropout=0.1),
        optim=optim_config(lr=1e-3, warmup_steps=2, weight_decay=1e-4),
    )
    c.run = "stage1,stage2"
    return c
