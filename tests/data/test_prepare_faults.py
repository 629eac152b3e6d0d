"""The prepare step under hostile inputs and failures: text that cannot be stored, runs that fail midway."""

import json
import os

import pytest
from PIL import Image

from owl_jax.cli.prepare import main
from owl_jax.data import prepare as prep
from owl_jax.data import records
from owl_jax.data.prompts import SYSTEM


def write_alpaca(path, n, prefix="a"):
    path.write_text(json.dumps([{"instruction": f"q{i}", "output": f"{prefix}{i}"} for i in range(n)]))
    return str(path)


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_lone_surrogate_is_skipped_naming_file_and_line(tmp_path):
    # `"\ud800"` is valid JSON text but no UTF-8 string: it cannot be stored in a record.
    lines = [
        json.dumps({"text": f"{SYSTEM}\nHuman: q\nAI: a"}),
        '{"text": "Human: q\\nAI: hi \\ud800"}',
        '{"text": "Human: q2\\nAI: a2", "question_type": "x\\udfff"}',
        json.dumps({"text": f"{SYSTEM}\nHuman: q3\nAI: a3"}),
    ]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "out" / "data")
    assert main(["--format", "mplug_jsonl", "--input", str(path), "--output", prefix, "--no-progress",
                 "--max-skip-fraction", "0.5"]) == 0  # fmt: skip
    got = list(records.read_examples(records.find_shards(prefix)))
    assert [e.turns for e in got] == [[("q", "a")], [("q3", "a3")]]
    with open(prefix + records.MANIFEST_SUFFIX, encoding="utf-8") as f:
        m = json.load(f)
    assert m["skipped"] == {"invalid_example": 2}
    assert [s["item"] for s in m["skipped_examples"]] == [f"{path}:2", f"{path}:3"]
    assert "not valid Unicode" in m["skipped_examples"][0]["detail"]
    assert "source" in m["skipped_examples"][1]["detail"]

    # A caption list where one caption holds one: that caption alone is left out.
    Image.new("RGB", (4, 4), "red").save(tmp_path / "red.png")
    (tmp_path / "caps.jsonl").write_text('{"image": "red.png", "caption": ["a red square", "red \\udc80"]}\n')
    report = prep.prepare("captions", [str(tmp_path / "caps.jsonl")], str(tmp_path / "caps" / "data"),
                          progress=False, max_skip_fraction=0.5)  # fmt: skip
    assert (report.written, report.skipped) == (1, {"invalid_example": 1})
    assert report.skipped_examples[0]["item"] == f"{tmp_path / 'caps.jsonl'}:1"


def test_failed_overwrite_keeps_the_previous_dataset(tmp_path, monkeypatch):
    prefix = str(tmp_path / "out" / "data")
    prep.prepare("alpaca", [write_alpaca(tmp_path / "old.json", 3)], prefix, progress=False, examples_per_shard=1)
    before = snapshot(tmp_path / "out")
    assert len(before) == 4  # three shards and the manifest

    # Too many skips: the new run fails after writing its shards.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": " "}]))
    with pytest.raises(prep.PrepareError, match="skipped 1 of 2"):
        prep.prepare("alpaca", [str(bad)], prefix, progress=False, overwrite=True, examples_per_shard=1)
    assert snapshot(tmp_path / "out") == before

    # Interrupted while writing (Ctrl-C, or any error of the source): nothing new is left, the old is kept.
    def interrupted(*args, **kwargs):
        yield from prep.sources.alpaca_json(write_alpaca(tmp_path / "new.json", 2, "new"))
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "read_source", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare("alpaca", [str(bad)], prefix, progress=False, overwrite=True, examples_per_shard=1)
    assert snapshot(tmp_path / "out") == before
    monkeypatch.undo()

    # A run killed outright leaves only temporary names behind, which are no dataset and are cleared next time.
    (tmp_path / "out" / "data.tmp-00000.array_record").write_bytes(b"cut")
    assert [e.turns[0][1] for e in records.read_examples(records.find_shards(prefix))] == ["a0", "a1", "a2"]
    # Success replaces every file of the old dataset, and only those (not another dataset beside it).
    other = str(tmp_path / "out" / "data-extra")
    prep.prepare("alpaca", [write_alpaca(tmp_path / "x.json", 1, "x")], other, progress=False)
    report = prep.prepare("alpaca", [write_alpaca(tmp_path / "new.json", 2, "new")], prefix, progress=False,
                          overwrite=True)  # fmt: skip
    assert sorted(os.listdir(tmp_path / "out")) == [
        "data-00000-of-00001.array_record",
        "data-extra-00000-of-00001.array_record",
        "data-extra.manifest.json",
        "data.manifest.json",
    ]
    assert [e.turns[0][1] for e in records.read_examples(report.shards)] == ["new0", "new1"]
    assert [e.turns[0][1] for e in records.read_examples(records.find_shards(other))] == ["x0"]


def test_cli_errors_exit_2_in_one_line(tmp_path, capsys):
    prefix = str(tmp_path / "out" / "data")
    path = write_alpaca(tmp_path / "a.json", 1)
    assert main(["--format", "alpaca", "--input", path, "--output", prefix, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["--format", "alpaca", "--input", path, "--output", prefix, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
