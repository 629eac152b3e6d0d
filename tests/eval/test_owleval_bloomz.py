"""`owl-eval answer` with the BLOOMZ fixture (a `tokenizer.json` checkpoint) on a two-question OwlEval folder:
the answers equal greedy `Generator.generate` of the released prompts, the second turn seeing the first."""

import json
import shutil

import owl_jax
from helpers import BLOOMZ, make_owleval
from owl_jax.cli.eval import main
from owl_jax.data.prompts import build_conversation
from owl_jax.inference.generate import GenerationConfig, Generator

# One conversation of two turns on one picture, in two of the released languages.
QUESTIONS = [
    (1, "1.png", "图片里画的是什么？", "a,b", ["single_turn", "multi_turn"]),
    (2, "1.png", "Pourquoi pensez-vous cela ?", "a,e,f", ["multi_turn"]),
]
MAX_NEW = 8


def test_answer_command_takes_the_bloomz_checkpoint(tmp_path):
    checkpoint = tmp_path / "bloomz-tiny"
    shutil.copytree(BLOOMZ / "checkpoint", checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(BLOOMZ / name, checkpoint / name)
    owleval = make_owleval(tmp_path / "owleval", QUESTIONS)
    out = tmp_path / "answers.jsonl"
    args = ["answer", "--checkpoint", str(checkpoint), "--owleval", str(owleval), "--out", str(out)]
    assert main([*args, "--max-new-tokens", str(MAX_NEW), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(r["question_id"], r["question"], r["model_id"]) for r in rows] == [
        (1, QUESTIONS[0][2], "bloomz-tiny"),
        (2, QUESTIONS[1][2], "bloomz-tiny"),
    ]

    model, processor = owl_jax.from_pretrained(checkpoint, show_progress=False)
    assert processor.bos_token_id == 1 and processor.eos_token_id == 2
    generator = Generator(model)
    config = GenerationConfig(
        max_new_tokens=MAX_NEW,
        eos_token_id=processor.eos_token_id,
        bos_token_id=processor.bos_token_id,
        pad_token_id=processor.pad_token_id,
    )
    image = owleval / "cases" / "1.png"

    def greedy(turns):
        inputs = processor(build_conversation(turns), images=[image])
        out = generator.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], config)
        return processor.decode([t for t in out.tokens[0] if t != processor.eos_token_id]).strip()

    first = greedy([(1, QUESTIONS[0][2], None)])
    assert rows[0]["answer"] == first and first
    assert rows[1]["answer"] == greedy([(1, QUESTIONS[0][2], first), (0, QUESTIONS[1][2], None)])
