"""The demo's held-out questions exported in VQAv2's layout round-trip through the VQAv2 loader and metric."""

import numpy as np
from PIL import Image

from owl_jax.data.synthetic import generate, parse_templated_text, read_jsonl
from owl_jax.eval.bench import evaluate_vqav2
from owl_jax.eval.bench.synthetic_vqav2 import export_vqav2
from owl_jax.eval.bench.tasks import SHORT_ANSWER, load_task


def test_export_round_trip(tmp_path):
    data = generate(tmp_path / "synthetic", n_captions=0, n_multimodal=0, n_text=0, n_eval_per_type=2)
    counts = export_vqav2(data.eval, tmp_path / "vqav2")
    assert counts == {
        "questions": 8,
        "by_type": {"color": 2, "shape": 2, "count": 2, "position": 2},
        "skipped": {"two_image": 2, "multi_turn": 2, "text": 2},
    }
    task = load_task("vqav2", tmp_path / "vqav2")
    assert [i.question_id for i in task.items] == [1000 * n for n in range(1, 9)]
    kept = [r for r in read_jsonl(data.eval) if r["question_type"] in ("color", "shape", "count", "position")]
    raw = {}
    for item, row in zip(task.items, kept, strict=True):
        ((question, answer),) = parse_templated_text(row["text"])[0]
        assert item.question == f"{question}\n{SHORT_ANSWER}"
        raw[item.question_id] = answer
        gt = task.ground_truth[item.question_id]
        assert gt["question_type"] == row["question_type"] and len(gt["answers"]) == 10
        assert gt["answer_type"] == ("number" if row["question_type"] == "count" else "other")
        # The JPEG copy shows the same picture as the demo's PNG.
        original = np.asarray(Image.open(tmp_path / "synthetic" / row["image"][0]).convert("RGB"), np.float32)
        exported = np.asarray(Image.open(item.image), np.float32)
        assert exported.shape == original.shape and np.abs(exported - original).mean() < 3
    assert {raw[q] for q, gt in task.ground_truth.items() if gt["answer_type"] == "number"} <= {"one", "two", "three"}
    # The stored answers in VQA's normalisation ("2"), and the demo's own words ("two"), both score 100%.
    stored = {q: gt["answers"][0] for q, gt in task.ground_truth.items()}
    assert all(stored[q] != raw[q] for q in stored if task.ground_truth[q]["answer_type"] == "number")
    for predictions in (stored, raw):
        results = evaluate_vqav2(predictions, task.ground_truth)
        assert results["overall"] == 100.0
        assert set(results["per_question_type"]) == {"color", "shape", "count", "position"}
    wrong = {**stored, **{q: "purple" for q in list(stored)[:2]}}
    assert evaluate_vqav2(wrong, task.ground_truth)["overall"] == 75.0


def test_the_main_jobs_data_holds_its_held_out_set_in_vqav2_layout(tmp_path):
    """The main job's synthetic data folder comes with `vqav2/`, so `--task vqav2` scores the demo too."""
    from helpers import tiny_training_config
    from owl_jax.training.run import prepare_synthetic

    syn = tiny_training_config().synthetic
    syn.update(n_captions=2, n_multimodal=2, n_text=1, n_eval_per_type=2)
    prepare_synthetic(tmp_path / "data", syn)
    task = load_task("vqav2", tmp_path / "data" / "vqav2")
    types = [task.ground_truth[i.question_id]["question_type"] for i in task.items]
    assert sorted(types) == sorted(["color", "shape", "count", "position"] * 2)
