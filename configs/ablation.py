"""The paper's training-strategy ablation (its RQ1 and RQ2, Tables 4 and 5), in miniature on the embedded demo.

Every variant starts where the full recipe would: the demo's LLM warm-up and stage 1 run once and are shared.
Each stage-2 variant then starts from the stage named in its `start_from`:

- `stage1_only`: multimodal pre-training alone (the demo's stage 1; no instruction tuning);
- `full_recipe`: the paper's two stages, joint text-only + multimodal instruction tuning with LoRA;
- `no_pretrain`: stage 2 straight from the towers (the warmed-up LLM and the untrained ViT), no stage 1;
- `mm_instruct_only`: stage 2 on multimodal instructions only;
- `text_instruct_only`: stage 2 on text-only instructions only;
- `full_finetune`: stage 2 fine-tuning the whole LLM instead of LoRA.

Every stage-2 variant has the same steps, batch, learning rate and seed as the full recipe. The run ends
with one table of held-out answers the models generate, per question type ("text" is the text-only
instruction accuracy), one column per variant.

    python train.py --config configs/ablation.py
"""

import copy

from configs import default


def _variant(base, *, sources=None, start_from: str, kind: str | None = None):
    stage = copy.deepcopy(base)
    stage.start_from = start_from
    if sources is not None:
        stage.data.sources = tuple(tuple(group) for group in sources)
    if kind is not None:
        stage.kind = kind
        stage.lora.rank = 0
    return stage


def get_config():
    c = default.get_config()
    c.workdir = "runs/ablation"
    stage1, stage2 = c.stages.stage1, c.stages.stage2
    del c.stages["stage1"], c.stages["stage2"]
    c.stages.stage1_only = stage1
    c.stages.full_recipe = _variant(stage2, start_from="stage1_only")
    c.stages.no_pretrain = _variant(stage2, start_from="llm_warmup")
    c.stages.mm_instruct_only = _variant(stage2, start_from="stage1_only", sources=[["instruct_multimodal"]])
    c.stages.text_instruct_only = _variant(stage2, start_from="stage1_only", sources=[["instruct_text"]])
    c.stages.full_finetune = _variant(stage2, start_from="stage1_only", kind="stage2_full")
    c.run = "llm_warmup,stage1_only,full_recipe,no_pretrain,mm_instruct_only,text_instruct_only,full_finetune"
    return c
