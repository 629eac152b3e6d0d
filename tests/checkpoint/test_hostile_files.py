"""Checkpoint folders built to break the converter: each gives exit 2 and one line naming the file or key."""

import json
import shutil

import pytest

from helpers import FIXTURE
from owl_jax.checkpoint import CheckpointError, weight_files
from owl_jax.cli.convert import main as convert_main

BIN_INDEX = "pytorch_model.bin.index.json"


def _sharded_copy(tmp_path, weight_map) -> str:
    """The fixture's sharded checkpoint with its index's weight_map replaced."""
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURE / "checkpoint-sharded", folder)
    index = json.loads((folder / BIN_INDEX).read_text())
    index["weight_map"] = weight_map(index["weight_map"])
    (folder / BIN_INDEX).write_text(json.dumps(index))
    return str(folder)


def _import(capsys, folder, tmp_path) -> tuple[int, str]:
    status = convert_main(["import", folder, str(tmp_path / "out"), "--quiet"])
    return status, capsys.readouterr().err


@pytest.mark.parametrize("shard", ["../other/pytorch_model.bin", "/etc/passwd", "../../../../etc/passwd", ".."])
def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path, capsys, shard):
    # An index that points outside its own folder would convert another model's weights, or open any file.
    other = tmp_path / "other"
    shutil.copytree(FIXTURE / "checkpoint-sharded", other)
    folder = _sharded_copy(tmp_path, lambda m: {k: shard for k in m})
    with pytest.raises(CheckpointError, match=r"weight_map\[.*is not a file name in this folder"):
        weight_files(folder)
    status, err = _import(capsys, folder, tmp_path)
    assert status == 2 and err.count("\n") == 1 and BIN_INDEX in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weight_map", [lambda m: list(m.values()), lambda m: {k: 3 for k in m}])
def test_index_with_a_malformed_weight_map_is_refused(tmp_path, capsys, weight_map):
    folder = _sharded_copy(tmp_path, weight_map)
    status, err = _import(capsys, folder, tmp_path)
    assert status == 2 and err.startswith("error: ") and BIN_INDEX in err and "Traceback" not in err


def test_empty_weight_file_is_named(tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    status, err = _import(capsys, str(folder), tmp_path)
    assert status == 2 and "pytorch_model.bin is empty (0 bytes)" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_weight_file_of_garbage_is_named(tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80not a checkpoint")
    status, err = _import(capsys, str(folder), tmp_path)
    assert status == 2 and "pytorch_model.bin" in err and "Traceback" not in err
