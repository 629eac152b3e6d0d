"""Stage 1, multimodal pre-training (paper, appendix): ViT + abstractor train, the LLM (LLaMA or BLOOM) frozen.

Image-caption pairs (LAION-400M, COYO-700M, CC, COCO: prepare them with `python -m owl_jax.data.prepare
--format captions|webdataset|tfds`), 50k steps of 4096 pairs, AdamW β (0.9, 0.98), ε 1e-6, lr 2e-4 cosine,
warmup 375, weight decay 0.01, max length 512. The model starts from an HF CLIP ViT-L/14 and LLaMA-7B (or an
HF BLOOM folder, e.g. BLOOMZ-7b1, as `model.llama`; its tokenizer comes from that folder):

    python train.py --config configs/stage1_pretrain.py --config.model.clip=CLIP_DIR --config.model.llama=LLAMA_DIR \\
        --config.data.dir=DATA_DIR --config.mesh.fsdp=-1 --config.mesh.data=1
"""

from owl_jax.training.schema import base_config, optim_config, stage_config


def get_config():
    c = base_config()
    c.workdir = "runs/stage1_pretrain"
    c.model.update(init="towers", clip="", llama="", num_query_tokens=64, dtype="bfloat16", remat_policy="full")
    c.data.update(seq_len=512, max_images=1, augment=True, eval=())
    c.stages.stage1 = stage_config(
        "stage1",
        steps=50_000,
        batch_size=4096,
        sources=[["captions"]],
        frozen_dtype="bfloat16",
        optim=optim_config(lr=2e-4, warmup_steps=375, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01),
    )
    c.run = "stage1"
    c.checkpoint.update(every=1000, keep=3)
    return c
