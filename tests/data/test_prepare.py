"""The prepare step: every source format into ArrayRecord shards, and what happens to bad inputs."""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from owl_jax.data import prepare as prep
from owl_jax.data import records, sources
from owl_jax.data.prompts import SYSTEM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_bytes(color, fmt="PNG", size=(6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def save_image(folder, name, color, fmt="PNG") -> bytes:
    data = image_bytes(color, fmt)
    (folder / name).write_bytes(data)
    return data


def write_json(path, value):
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tmp_path, format, inputs, **kwargs):
    prefix = str(tmp_path / "out" / "data")
    report = prep.prepare(format, [str(p) for p in inputs], prefix, progress=False, **kwargs)
    return report, list(records.read_examples(records.find_shards(prefix))), prefix


def manifest(prefix):
    with open(prefix + records.MANIFEST_SUFFIX, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture()
def images(tmp_path):
    """Three small images on disk: red.png, green.jpg, blue.png."""
    folder = tmp_path / "images"
    folder.mkdir()
    return {
        "red": save_image(folder, "red.png", "red"),
        "green": save_image(folder, "green.jpg", "green", "JPEG"),
        "blue": save_image(folder, "blue.png", "blue"),
    }


# ---------------------------------------------------------------------------------------------- formats


def test_mplug_jsonl(tmp_path, images):
    rows = [
        {
            "image": ["red.png"],
            "text": f"{SYSTEM}\nHuman: <image>\nHuman: What color?\nAI: Red.",
            "task_type": "llava_sft",
        },
        {
            "image": ["red.png", "green.jpg"],
            "text": f"{SYSTEM}\nHuman: <image>\nHuman: <image>\nHuman: Compare them.\nAI: Red vs green.\n",
            "task_type": "llava_sft",
        },
        {"text": f"{SYSTEM}\nHuman: Write a list.\nAI: 1. one\n2. two\n", "task_type": "gpt4instruct_sft"},
        {
            "image": [],
            "text": f"{SYSTEM}\nHuman: Hi\nAI: Hello!\nHuman: How are you?\nAI: Fine.\n\nThanks.",
            "task_type": "sharegpt_chat_sft",
        },
    ]
    path = write_jsonl(tmp_path / "images" / "instruct.jsonl", rows)
    report, got, prefix = run(tmp_path, "mplug_jsonl", [path])
    assert report.written == 4 and report.num_skipped == 0
    assert [(e.turns, e.images, e.task, e.source) for e in got] == [
        ([("What color?", "Red.")], [images["red"]], "multimodal", "llava_sft"),
        ([("Compare them.", "Red vs green.")], [images["red"], images["green"]], "multimodal", "llava_sft"),
        ([("Write a list.", "1. one\n2. two")], [], "text", "gpt4instruct_sft"),
        ([("Hi", "Hello!"), ("How are you?", "Fine.\n\nThanks.")], [], "text", "sharegpt_chat_sft"),
    ]
    assert got[0].id == "instruct.jsonl:1"
    m = manifest(prefix)
    assert m["format"] == "mplug_jsonl" and m["num_examples"] == 4 and m["tasks"] == {"multimodal": 2, "text": 2}
    assert m["shards"] == ["data-00000-of-00001.array_record"]


def test_parse_mplug_text_edge_cases():
    assert sources.parse_mplug_text("Human: q\nAI:\ncode()") == (0, [("q", "\ncode()")])
    assert sources.parse_mplug_text(f"{SYSTEM}\nHuman: q AI: a") == (0, [("q ", "a")])
    with pytest.raises(sources.TemplateError, match="no 'AI:'"):
        sources.parse_mplug_text(f"{SYSTEM}\nHuman: a question without answer")


def test_llava(tmp_path, images):
    items = [
        {
            "id": "a1",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is it?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {
            "id": "a2",
            "image": "blue.png",
            "conversations": [
                {"from": "human", "value": "Describe.\n<image>"},
                {"from": "gpt", "value": "A blue square."},
            ],
        },
        {"id": "t1", "conversations": [{"from": "human", "value": "No image here"}, {"from": "gpt", "value": "Ok."}]},
    ]
    report, got, _ = run(
        tmp_path, "llava", [write_json(tmp_path / "llava.json", items)], image_root=str(tmp_path / "images")
    )
    assert [(e.id, e.turns, e.images, e.task) for e in got] == [
        ("a1", [("What color is it?", "Red."), ("Sure?", "Yes.")], [images["red"]], "multimodal"),
        ("a2", [("Describe.", "A blue square.")], [images["blue"]], "multimodal"),
        ("t1", [("No image here", "Ok.")], [], "text"),
    ]


def test_alpaca(tmp_path):
    items = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
    ]
    _, got, _ = run(tmp_path, "alpaca", [write_json(tmp_path / "alpaca.json", items)])
    assert [(e.turns, e.images, e.task) for e in got] == [
        ([("Add the numbers.\n2 and 3", "5")], [], "text"),
        ([("Name a color.", "Blue.")], [], "text"),
    ]


def test_sharegpt(tmp_path):
    items = [
        {
            "id": "s1",
            "conversations": [
                {"from": "system", "value": "be nice"},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "user", "value": "Bye"},
                {"from": "chatgpt", "value": "Bye!"},
                {"from": "human", "value": "unanswered"},
            ],
        },
        {
            "id": "s2",
            "conversations": [
                {"from": "gpt", "value": "greeting first"},
                {"from": "user", "value": "Q"},
                {"from": "assistant", "value": "A"},
            ],
        },
    ]
    report, got, _ = run(tmp_path, "sharegpt", [write_json(tmp_path / "sharegpt.json", items)])
    assert [(e.id, e.turns, e.task) for e in got] == [
        ("s1", [("Hi", "Hello"), ("Bye", "Bye!")], "text"),
        ("s2", [("Q", "A")], "text"),
    ]
    assert report.num_skipped == 0


def test_captions_jsonl_and_csv(tmp_path, images):
    folder = tmp_path / "images"
    jsonl = write_jsonl(
        folder / "caps.jsonl",
        [
            {"image": "red.png", "caption": "a red square"},
            {"file_name": "green.jpg", "text": "a green square"},
            {"image": "blue.png", "caption": ["blue one", "blue two"]},
        ],
    )
    with open(folder / "caps.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerow(["blue.png", "a blue square, with a comma"])
    report, got, _ = run(tmp_path, "captions", [jsonl, folder / "caps.csv"])
    assert [(e.turns, e.images, e.task) for e in got] == [
        ([("", "a red square")], [images["red"]], "caption"),
        ([("", "a green square")], [images["green"]], "caption"),
        ([("", "blue one")], [images["blue"]], "caption"),
        ([("", "blue two")], [images["blue"]], "caption"),
        ([("", "a blue square, with a comma")], [images["blue"]], "caption"),
    ]
    assert [e.id for e in got] == ["caps.jsonl:1", "caps.jsonl:2", "caps.jsonl:3#0", "caps.jsonl:3#1", "caps.csv:2"]


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset(tmp_path):
    red, green = image_bytes("red", "JPEG"), image_bytes("green", "JPEG")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        add_member(tar, "000000001.jpg", red)
        add_member(tar, "000000001.txt", b"a red square")
        add_member(tar, "000000001.json", b'{"caption": "ignored, the .txt wins", "status": "success"}')
        add_member(tar, "000000002.jpg", green)
        add_member(tar, "000000002.json", b'{"caption": "caption from json"}')
        add_member(tar, "000000003.txt", b"caption without image")
    report, got, prefix = run(tmp_path, "webdataset", [tmp_path], max_skip_fraction=0.5)
    assert [(e.id, e.turns, e.images, e.task) for e in got] == [
        ("00000.tar:000000001", [("", "a red square")], [red], "caption"),
        ("00000.tar:000000002", [("", "caption from json")], [green], "caption"),
    ]
    assert report.skipped == {"missing_image": 1}


def test_tfds_captions(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    # Unregistered, as for a CLI user: tfds.data_source then reads the dataset from its files in data_dir.
    with tfds.core.registered.skip_registration():

        class OwlPrepareTinyCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(shape=(None, None, 3)),
                            "caption": tfds.features.Text(),
                            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                            "pixels": tfds.features.Tensor(shape=(4, 6, 3), dtype=np.uint8),
                        }
                    ),
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                # Encoded bytes: encoding arrays would need TensorFlow, which is not installed.
                for i, color in enumerate(["red", "blue"]):
                    yield (
                        i,
                        {
                            "image": image_bytes(color),
                            "caption": f"a {color} square",
                            "captions": {"text": [f"{color} {j}" for j in range(i + 1)]},
                            "pixels": np.asarray(Image.open(io.BytesIO(image_bytes(color)))),
                        },
                    )

    data_dir = str(tmp_path / "tfds")
    OwlPrepareTinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
    report, got, _ = run(tmp_path, "tfds", [], tfds_name="owl_prepare_tiny_captions", data_dir=data_dir)
    assert [(e.turns, e.images, e.task) for e in got] == [
        ([("", "a red square")], [image_bytes("red")], "caption"),
        ([("", "a blue square")], [image_bytes("blue")], "caption"),
    ]
    assert report.inputs == ["tfds:owl_prepare_tiny_captions/train"]

    _, got, _ = run(
        tmp_path / "nested",
        "tfds",
        [],
        tfds_name="owl_prepare_tiny_captions",
        data_dir=data_dir,
        caption_key="captions/text",
    )
    assert [(e.id, e.turns[0][1]) for e in got] == [
        ("owl_prepare_tiny_captions/0", "red 0"),
        ("owl_prepare_tiny_captions/1#0", "blue 0"),
        ("owl_prepare_tiny_captions/1#1", "blue 1"),
    ]

    # A decoded uint8 array (not an Image feature) is stored as a PNG of the same pixels.
    _, got, _ = run(
        tmp_path / "array", "tfds", [], tfds_name="owl_prepare_tiny_captions", data_dir=data_dir, image_key="pixels"
    )
    assert [np.asarray(Image.open(io.BytesIO(e.images[0]))).tolist() for e in got] == [
        np.asarray(Image.open(io.BytesIO(image_bytes(c)))).tolist() for c in ("red", "blue")
    ]


def test_shards_and_limit(tmp_path):
    items = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(7)]
    report, got, prefix = run(
        tmp_path, "alpaca", [write_json(tmp_path / "a.json", items)], examples_per_shard=2, limit=5
    )
    assert [e.turns[0][1] for e in got] == ["a0", "a1", "a2", "a3", "a4"]
    assert len(report.shards) == 3 and manifest(prefix)["shards"][2] == "data-00002-of-00003.array_record"
    with pytest.raises(prep.PrepareError, match="--overwrite"):
        prep.prepare("alpaca", [str(tmp_path / "a.json")], prefix, progress=False)
    prep.prepare("alpaca", [str(tmp_path / "a.json")], prefix, progress=False, overwrite=True)
    assert len(records.find_shards(prefix)) == 1


# ------------------------------------------------------------------------------------------ bad inputs


def assert_skipped(prefix, reason, item_suffix):
    m = manifest(prefix)
    assert m["skipped"] == {reason: 1} and m["num_skipped"] == 1
    [skip] = m["skipped_examples"]
    assert skip["reason"] == reason and skip["item"].endswith(item_suffix), skip


def good_and_bad_llava(tmp_path, bad_image):
    good = [
        {
            "id": f"g{i}",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        }
        for i in range(3)
    ]
    bad = {
        "id": "bad",
        "image": bad_image,
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
    }
    return write_json(tmp_path / "images" / "llava.json", good[:1] + [bad] + good[1:])


def test_corrupt_image_is_skipped(tmp_path, images):
    (tmp_path / "images" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    report, got, prefix = run(tmp_path, "llava", [good_and_bad_llava(tmp_path, "corrupt.jpg")], max_skip_fraction=0.5)
    assert [e.id for e in got] == ["g0", "g1", "g2"]
    assert_skipped(prefix, "corrupt_image", "llava.json[1]")
    assert "corrupt.jpg" in manifest(prefix)["skipped_examples"][0]["detail"]


def test_missing_image_is_skipped(tmp_path, images):
    report, got, prefix = run(tmp_path, "llava", [good_and_bad_llava(tmp_path, "nowhere.jpg")], max_skip_fraction=0.5)
    assert [e.id for e in got] == ["g0", "g1", "g2"]
    assert_skipped(prefix, "missing_image", "llava.json[1]")


def test_decompression_bomb_is_skipped():
    with pytest.raises(sources.ImageProblem) as info:
        sources.check_image_bytes(image_bytes("red", size=(200, 200)), "big.png", max_pixels=100 * 100)
    assert info.value.reason == "image_too_large"


def test_malformed_jsonl_line_is_skipped(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [{"text": f"{SYSTEM}\nHuman: q\nAI: a"}, '{"text": "unterminated', {"text": f"{SYSTEM}\nHuman: q2\nAI: a2"}],
    )
    report, got, prefix = run(tmp_path, "mplug_jsonl", [path], max_skip_fraction=0.5)
    assert [e.turns for e in got] == [[("q", "a")], [("q2", "a2")]]
    assert_skipped(prefix, "malformed_json", "x.jsonl:2")


def test_empty_conversation_is_skipped(tmp_path):
    items = [
        {"id": "ok", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"id": "empty", "conversations": []},
    ]
    report, got, prefix = run(tmp_path, "sharegpt", [write_json(tmp_path / "s.json", items)], max_skip_fraction=0.5)
    assert [e.id for e in got] == ["ok"]
    assert_skipped(prefix, "empty_conversation", "s.json[1]")


def test_empty_answer_is_skipped(tmp_path):
    items = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "   "}]
    report, got, prefix = run(tmp_path, "alpaca", [write_json(tmp_path / "a.json", items)], max_skip_fraction=0.5)
    assert len(got) == 1
    assert_skipped(prefix, "empty_answer", "a.json[1]")


def test_non_alternating_sharegpt_is_skipped(tmp_path):
    items = [
        {"id": "ok", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {
            "id": "twice",
            "conversations": [
                {"from": "human", "value": "Q1"},
                {"from": "human", "value": "Q2"},
                {"from": "gpt", "value": "A"},
            ],
        },
    ]
    report, got, prefix = run(tmp_path, "sharegpt", [write_json(tmp_path / "s.json", items)], max_skip_fraction=0.5)
    assert [e.id for e in got] == ["ok"]
    assert_skipped(prefix, "non_alternating", "s.json[1]")
    assert "message 1" in manifest(prefix)["skipped_examples"][0]["detail"]


def test_too_many_skips_fails_and_leaves_no_shards(tmp_path, images):
    path = good_and_bad_llava(tmp_path, "nowhere.jpg")  # 1 of 4 items skipped: 25%
    prefix = str(tmp_path / "out" / "data")
    with pytest.raises(prep.PrepareError) as info:
        prep.prepare("llava", [str(path)], prefix, progress=False, max_skip_fraction=0.1, examples_per_shard=1)
    message = str(info.value)
    assert "skipped 1 of 4 items (25.0%)" in message and "missing_image x1" in message
    assert "llava.json[1]" in message and "nowhere.jpg" in message
    assert os.listdir(tmp_path / "out") == []


def test_unreadable_input_file_names_it(tmp_path):
    good = write_json(tmp_path / "good.json", [{"instruction": "q", "output": "a"}])
    bad = tmp_path / "broken.json"
    bad.write_text("[{", encoding="utf-8")
    # The good file is already being written when the broken one fails: its partial shard must go too.
    with pytest.raises(sources.SourceError, match=r"broken.json: not valid JSON \(line 1"):
        prep.prepare("alpaca", [str(good), str(bad)], str(tmp_path / "out" / "data"), progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_csv_without_caption_column_names_the_file(tmp_path):
    (tmp_path / "caps.csv").write_text("image,label\na.png,cat\n", encoding="utf-8")
    with pytest.raises(sources.SourceError, match="caps.csv: the header needs"):
        prep.prepare("captions", [str(tmp_path / "caps.csv")], str(tmp_path / "out" / "data"), progress=False)


def test_truncated_tar_keeps_what_was_read(tmp_path):
    red = image_bytes("red")
    with tarfile.open(tmp_path / "full.tar", "w") as tar:
        for i in range(4):
            add_member(tar, f"{i:09d}.png", red)
            add_member(tar, f"{i:09d}.txt", f"caption {i}".encode())
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        members = tar.getmembers()  # [0.png, 0.txt, 1.png, 1.txt, 2.png, 2.txt, ...]

    # An interrupted download cut inside a header: tarfile alone would take that as a normal end.
    (tmp_path / "a.tar").write_bytes(data[: members[5].offset + 100])
    report, got, prefix = run(tmp_path / "a", "webdataset", [tmp_path / "a.tar"], max_skip_fraction=0.7)
    assert [e.turns[0][1] for e in got] == ["caption 0", "caption 1"]
    # Sample 2 lost its caption; the archive as a whole is reported truncated.
    assert report.skipped == {"missing_caption": 1, "truncated_archive": 1}

    # Cut inside a member's data.
    (tmp_path / "b.tar").write_bytes(data[: members[4].offset_data + 10])
    report, got, prefix = run(tmp_path / "b", "webdataset", [tmp_path / "b.tar"], max_skip_fraction=0.7)
    assert [e.turns[0][1] for e in got] == ["caption 0", "caption 1"] and report.skipped == {"truncated_archive": 1}


def test_cli(tmp_path, capsys):
    items = [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": "a2"}]
    path = write_json(tmp_path / "a.json", items)
    prefix = tmp_path / "cli" / "data"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [
        sys.executable,
        "-m",
        "owl_jax.data.prepare",
        "--format",
        "alpaca",
        "--input",
        str(path),
        "--output",
        str(prefix),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "prepared 2 examples (text 2)" in done.stdout and "prepare alpaca" in done.stderr  # summary, progress bar
    assert [e.turns for e in records.read_examples(records.find_shards(str(prefix)))] == [[("q", "a")], [("q2", "a2")]]
    # The failure path in-process: a second subprocess would double the test's time (importing jax).
    from owl_jax.cli.prepare import main

    assert main(cmd[3:] + ["--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
