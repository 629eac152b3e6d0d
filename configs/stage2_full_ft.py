"""Stage 2 without LoRA: the LLM's weights (LLaMA or BLOOM) train in full (+ the abstractor), the ViT stays frozen.

Same data and schedule as `stage2_instruct` (the released `train_it_wo_lora.sh` variant).
"""

from configs import stage2_instruct


def get_config():
    c = stage2_instruct.get_config()
    c.workdir = "runs/stage2_full_ft"
    c.stages.stage2.kind = "stage2_full"
    c.stages.stage2.lora.rank = 0
    return c
