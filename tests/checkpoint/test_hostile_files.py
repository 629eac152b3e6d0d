"""Checkpoint folders built to break the converter: each gives exit 2 and one line naming the file or key.

The campaign at the end (`hostile`) truncates and flips bytes of every kind of input file (config.json,
`.bin` and safetensors weights, single and sharded, and their indexes): the converter either converts or
exits 2 with one error, never a traceback.
"""

import json
import os
import random
import shutil

import pytest

import hostile
from helpers import FIXTURE
from owl_jax.checkpoint import CheckpointError, open_tensor_file, weight_files, write_hf_tensors
from owl_jax.cli.convert import main as convert_main
from owl_jax.config import ConfigError, OwlConfig

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


def _with_config(tmp_path, edit) -> str:
    """The fixture's checkpoint (weights linked, not copied) with its config.json edited by `edit(config)`,
    or replaced by `edit` itself when it is bytes."""
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("pytorch_model.bin", "generation_config.json"):
        (folder / name).symlink_to(FIXTURE / "checkpoint" / name)
    if isinstance(edit, bytes):
        (folder / "config.json").write_bytes(edit)
    else:
        config = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _set(path: str, value):
    """An edit that sets the dotted key `path` of the config to `value`."""

    def edit(config):
        *parents, key = path.split(".")
        for p in parents:
            config = config[p]
        config[key] = value

    return edit


BAD_CONFIGS = [
    (_set("text_config", None), "text_config must be an object, got null"),
    (_set("text_config.num_attention_heads", 0), "text_config.num_attention_heads must be a positive integer, got 0"),
    (_set("text_config.hidden_size", "x"), 'text_config.hidden_size must be a positive integer, got "x"'),
    (_set("vision_config.hidden_size", -64), "vision_config.hidden_size must be a positive integer, got -64"),
    (_set("visual_abstractor_config", [1, 2]), "visual_abstractor_config must be an object, got [1, 2]"),
    (_set("vision_config.num_hidden_layers", True), "vision_config.num_hidden_layers must be a positive integer"),
    (_set("text_config.num_hidden_layers", 10**12), "text_config.num_hidden_layers must be a positive integer no"),
    (_set("text_config.vocab_size", None), "text_config.vocab_size must be a positive integer, got null"),
    (_set("text_config.num_attention_heads", 5), "text_config.hidden_size 96 is not divisible by text_config.num_a"),
    (_set("text_config.num_key_value_heads", 3), "text_config.num_attention_heads 4 is not divisible by text_config"),
    (_set("vision_config.image_size", 100), "vision_config.image_size 100 is not divisible by vision_config.patch"),
    (_set("visual_abstractor_config.num_attention_heads", 6), "visual_abstractor_config.hidden_size 64 is not div"),
    (_set("text_config.rms_norm_eps", "1e-6"), 'text_config.rms_norm_eps must be a positive number, got "1e-6"'),
    (_set("text_config.rope_theta", -1), "text_config.rope_theta must be a positive number, got -1"),
    (_set("text_config.rope_scaling", "linear"), 'text_config.rope_scaling must be an object or null, got "linear"'),
    (_set("text_config.eos_token_id", []), "text_config.eos_token_id must be an integer token id or a non-empty"),
    (_set("text_config.hidden_act", 3), "text_config.hidden_act must be a string, got 3"),
    (_set("visual_abstractor_config.attention_probs_dropout_prob", 2), "attention_probs_dropout_prob must be a nu"),
    (_set("num_query_tokens", "8"), 'num_query_tokens must be a positive integer, got "8"'),
    (_set("visual_abstractor_config.hidden_size", 96), "abstractor hidden_size 96 != vision hidden_size 64"),
    (b"[1, 2]", "must hold a JSON object, got [1, 2]"),
    (b'{"text_config": ', "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, edit, message):
    folder = _with_config(tmp_path, edit)
    status, err = _import(capsys, folder, tmp_path)
    assert status == 2 and err.startswith(f"error: {folder}/config.json") and err.count("\n") == 1, err
    assert "Traceback" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_config_dict_names_config_json():
    config = json.loads((FIXTURE / "checkpoint" / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = 0
    with pytest.raises(ConfigError, match=r"^config.json: text_config.num_attention_heads must be a positive integer"):
        OwlConfig.from_hf_config(config)


# ---- the campaign: damaged copies of every kind of input file ----


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """`{name: folder}`: the fixture's `.bin` checkpoints, single and sharded, and the same weights as
    safetensors, single and sharded (with an index)."""
    root = tmp_path_factory.mktemp("sources")
    with open_tensor_file(str(FIXTURE / "checkpoint" / "pytorch_model.bin")) as f:
        tensors = [(k, *f.meta(k), lambda k=k: f.get(k)) for k in f.keys()]
        for name, max_shard in (("safetensors", None), ("safetensors-sharded", 700_000)):
            folder = root / name
            folder.mkdir()
            shutil.copy(FIXTURE / "checkpoint" / "config.json", folder)
            write_hf_tensors(str(folder), tensors, max_shard_bytes=max_shard, show_progress=False)
    return {
        "bin": FIXTURE / "checkpoint",
        "bin-sharded": FIXTURE / "checkpoint-sharded",
        "safetensors": root / "safetensors",
        "safetensors-sharded": root / "safetensors-sharded",
    }


DAMAGED = [
    ("bin", "config.json"),
    ("bin", "pytorch_model.bin"),
    ("bin-sharded", BIN_INDEX),
    ("bin-sharded", "pytorch_model-00002-of-00002.bin"),
    ("safetensors", "model.safetensors"),
    ("safetensors-sharded", "model.safetensors.index.json"),
    ("safetensors-sharded", "model-00001-of-00002.safetensors"),
]


def _damage(data: bytes, rng: random.Random) -> bytes:
    """`data` cut short, or with a few bytes flipped: most often where the structure is (the first and last
    4 kB: headers, pickles, zip directories), else anywhere."""
    if rng.random() < 0.4:
        return data[: rng.randrange(1, len(data))]
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.choice([rng.randrange(min(4096, len(data))), len(data) - 1 - rng.randrange(min(4096, len(data)))])
        if rng.random() < 0.2:
            where = rng.randrange(len(data))
        data[where] ^= 1 << rng.randrange(8)
    return bytes(data)


@pytest.mark.hostile
@pytest.mark.parametrize(("source", "name"), DAMAGED)
def test_damaged_input_converts_or_fails_in_one_error(tmp_path, capsys, sources, source, name):
    rng = random.Random(f"{source}/{name}")
    outcomes = []
    for case in range(hostile.sized(2, 40)):
        folder = tmp_path / f"hf{case}"
        folder.mkdir()
        for entry in os.listdir(sources[source]):
            if entry != name:
                (folder / entry).symlink_to(sources[source] / entry)
        (folder / name).write_bytes(_damage((sources[source] / name).read_bytes(), rng))
        out = tmp_path / f"out{case}"
        status = convert_main(["import", str(folder), str(out), "--quiet"])
        err = capsys.readouterr().err
        assert status in (0, 2) and "Traceback" not in err, err
        if status == 2:
            # One error, its first line naming the damaged file (or its folder, for keys that do not match).
            assert err.startswith("error: ") and err.count("error:") == 1, err
            assert str(folder) in err.splitlines()[0], err
            assert not out.exists()
        else:
            assert (out / "owl_jax.json").is_file() and err == ""
        assert not [n for n in os.listdir(tmp_path) if ".partial-" in n or ".old-" in n]
        outcomes.append(status)
