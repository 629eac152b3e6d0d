"""The loaders of the benchmarks' official file layouts: items, prompts, ground truth and one-line errors."""

import json

import pytest

from bench_datasets import CAPTIONS, TASK_DATA, make_mmbench, make_pope, make_vqav2
from owl_jax.eval.bench.layouts import coco_caption, vqav2
from owl_jax.eval.bench.runner import run_task
from owl_jax.eval.bench.tasks import OPTION_LETTER, SHORT_ANSWER, gather_answers, load_task


def test_vqav2_val(tmp_path):
    task = load_task("vqav2", make_vqav2(tmp_path))
    assert [i.key for i in task.items] == ["1000", "1001", "2000", "2001", "3000", "3001"]
    first = task.items[0]
    assert first.question == f"is there 1000?\n{SHORT_ANSWER}"
    assert first.image == str(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    assert task.ground_truth[1001] == {
        "answers": ["2"] * 4 + ["3"] * 6,
        "answer_type": "number",
        "question_type": "how many",
    }
    assert task.score({q: "yes" if q % 2 == 0 else "3" for q in task.ground_truth}, task.ground_truth)["overall"] == 100


def test_vqav2_llava_test_dev_writes_a_submission(tmp_path):
    rows = [{"question_id": 5, "image": "COCO_test2015_000000000005.jpg", "text": "Q?\nA", "category": "default"}]
    (tmp_path / vqav2.TEST_DEV_FILE).write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / vqav2.TEST_FILE).write_text("".join(json.dumps({**rows[0], "question_id": q}) + "\n" for q in (5, 6)))
    (tmp_path / "test2015").mkdir()
    task = load_task("vqav2", tmp_path)
    assert task.score is None and [(i.key, i.question) for i in task.items] == [("5", "Q?\nA")]

    def answer(items):
        return ["Two dogs."] * len(items)

    answer.rows = 1
    results = run_task(task, str(tmp_path / "out"), lambda: answer, {}, show_progress=False)
    assert results["metrics"] is None and results["submission"] == vqav2.SUBMISSION_FILE
    submitted = json.loads((tmp_path / "out" / vqav2.SUBMISSION_FILE).read_text())
    assert submitted == [{"question_id": 5, "answer": "2 dogs"}, {"question_id": 6, "answer": ""}]


def test_coco_caption_layouts(tmp_path):
    task = coco_caption.load(str(TASK_DATA["coco_caption"](tmp_path / "blip")), scorers=("BLEU",))
    assert task.ground_truth == CAPTIONS and [i.question_id for i in task.items] == [11, 12, 13]
    assert task.items[0].image == str(tmp_path / "blip" / "val2014" / "COCO_val2014_000000000011.jpg")
    # Karpathy's dataset_coco.json: only its test images.
    karpathy = tmp_path / "karpathy"
    karpathy.mkdir()
    images = [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
         "sentences": [{"raw": f"caption {i}", "tokens": []}]}
        for i, split in ((1, "train"), (2, "test"), (3, "restval"))
    ]  # fmt: skip
    (karpathy / "dataset_coco.json").write_text(json.dumps({"images": images}))
    assert coco_caption.load(str(karpathy), scorers=("BLEU",)).ground_truth == {2: ["caption 2"]}
    # COCO's own annotations file, under annotations/.
    official = tmp_path / "official"
    (official / "annotations").mkdir(parents=True)
    (official / "val2014").mkdir()
    data = {
        "images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],
        "annotations": [{"image_id": 7, "id": 1, "caption": "one"}, {"image_id": 7, "id": 2, "caption": "two"}],
    }
    (official / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    task = coco_caption.load(str(official), scorers=("BLEU",))
    assert task.ground_truth == {7: ["one", "two"]}
    assert task.items[0].image == str(official / "val2014" / "COCO_val2014_000000000007.jpg")


def test_pope_splits_and_ids(tmp_path):
    data = tmp_path / "pope"
    make_pope(data / "coco")  # LLaVA keeps the question files in coco/
    (data / "coco" / "val2014").rename(data / "val2014")
    task = load_task("pope", data)
    assert [i.key for i in task.items] == ["random/1", "random/2", "adversarial/1", "adversarial/2"]
    assert task.items[0].question == f"Is there a thing 1?\n{SHORT_ANSWER}"
    assert task.ground_truth["adversarial/1"] == {"label": "no", "category": "adversarial"}
    assert task.score({k: "Yes" for k in task.ground_truth}, task.ground_truth)["splits"]["random"]["recall"] == 1


def test_mme_both_layouts(tmp_path):
    task = load_task("mme", TASK_DATA["mme"](tmp_path))
    assert [i.key for i in task.items][1:3] == ["count/000000006040.png/1", "artwork/10002.jpg/0"]
    assert task.items[2].image == str(tmp_path / "MME_Benchmark_release_version" / "artwork" / "images" / "10002.jpg")
    assert task.items[0].question == f"Are there two dogs? Please answer yes or no.\n{SHORT_ANSWER}"
    assert task.ground_truth["count/000000006040.png/1"] == {
        "category": "count",
        "image": "count/000000006040.png",
        "answer": "Yes",
    }
    right = {k: gt["answer"] for k, gt in task.ground_truth.items()}
    assert task.score(right, task.ground_truth)["perception"] == 400.0


def test_mmbench_rotations(tmp_path):
    task = load_task("mmbench", make_mmbench(tmp_path))
    assert [(i.key, i.question_id, i.round) for i in task.items][:3] == [("0/0", 0, 0), ("0/1", 0, 1), ("1/0", 1, 0)]
    assert task.items[3].question == f"Which one 1?\nA. green\nB. blue\nC. red\n{OPTION_LETTER}"
    assert task.items[0].question.startswith("Look closely.\nWhich one 0?\nA. cat\nB. dog\n")
    assert task.items[0].image().size == (20, 16)
    options = {"A": "red", "B": "green", "C": "blue"}
    assert task.ground_truth[1] == {"options": options, "answer": "A", "category": "attribute"}
    # The right letter moves with the rotation: B, A for question 0; A, C, B for question 1.
    letters = dict(zip([i.key for i in task.items], ["B", "A", "A", "C", "B"]))
    answers = gather_answers(task.items, letters)
    assert answers == {0: ["B", "A"], 1: ["A", "C", "B"]}
    assert task.score(answers, task.ground_truth)["circular"] == 100.0


def test_scienceqa_image_questions_only(tmp_path):
    task = load_task("scienceqa_img", TASK_DATA["scienceqa_img"](tmp_path))
    assert [i.key for i in task.items] == ["5", "7"]
    assert task.items[1].question == (
        f"Context: Look at the picture.\nWhich is hotter?\nA. ice\nB. fire\n{OPTION_LETTER}"
    )
    assert task.items[0].image == str(tmp_path / "images" / "test" / "5" / "image.png")
    assert task.score({"5": "B", "7": "A"}, task.ground_truth)["img_accuracy"] == 50.0


def test_errors_name_the_file_and_field(tmp_path):
    data = make_vqav2(tmp_path / "v")
    (data / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [{"question_id": 1000}]}))
    with pytest.raises(ValueError, match=r"annotations.json: annotations\[0\]: no field 'answers'"):
        load_task("vqav2", data)
    data = make_pope(tmp_path / "p")
    with open(data / "coco_pope_random.json", "a") as f:
        f.write('{"question_id": 9, "image": "x.jpg", "text": "q", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"coco_pope_random.json:3: label must be 'yes' or 'no'"):
        load_task("pope", data)
    data = TASK_DATA["mme"](tmp_path / "m")
    (data / "MME_Benchmark_release_version" / "count" / "000000006040.txt").write_text("Is it? Yes\n")
    with pytest.raises(ValueError, match=r"000000006040.txt:1: expected 'question<TAB>Yes'"):
        load_task("mme", data)
    data = make_mmbench(tmp_path / "b")
    tsv = data / "mmbench_dev_20230712.tsv"
    tsv.write_text(tsv.read_text().replace("\tanswer\t", "\tresponse\t"))
    with pytest.raises(ValueError, match=r"mmbench_dev_20230712.tsv: no column 'answer'"):
        load_task("mmbench", data)
    with pytest.raises(ValueError, match=r"unknown task 'gqa'"):
        load_task("gqa", data)
