"""Quantized converted folders: `convert_weights.py import --quantize`, loading them back, what is refused."""

import json

import numpy as np
import pytest
from flax import nnx

import owl_jax
from helpers import FIXTURE
from owl_jax.checkpoint import CheckpointError
from owl_jax.checkpoint.converted import stored_shapes
from owl_jax.cli import convert

pytestmark = pytest.mark.compile_quickly


def _params(model) -> dict:
    return {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "int4"
    argv = ["import", str(FIXTURE / "checkpoint"), str(out), "--quantize", "int4", "--group-size", "32", "--quiet"]
    assert convert.main(argv) == 0
    return out


def test_the_folder_stores_integers_and_loads_back_as_quantized_at_load(int4_folder, reference):
    meta = json.loads((int4_folder / "owl_jax.json").read_text())
    assert meta["quantization"]["mode"] == "int4" and meta["quantization"]["group_size"] == 32
    shapes = stored_shapes(str(int4_folder))
    assert shapes[("language_model", "layers", "down_proj", "qvalue")] == (2, 128, 96)  # 256 inputs, packed
    assert shapes[("language_model", "layers", "down_proj", "qscale")] == (2, 8, 96)  # 256 / 32 groups
    assert ("language_model", "layers", "q_proj", "kernel") not in shapes
    # The folder loads quantized without being asked (and in bf16, the integers and scales untouched) ...
    stored, _ = owl_jax.from_pretrained(int4_folder, show_progress=False)
    spec = stored.config.quant
    assert spec is not None and spec.mode == "int4" and spec.group_size == 32
    # ... and holds what quantizing at load holds, bit for bit
    direct, _ = owl_jax.from_pretrained(FIXTURE / "checkpoint", quantize=spec, show_progress=False)
    a, b = _params(stored), _params(direct)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg="/".join(path))
    half, _ = owl_jax.from_pretrained(int4_folder, dtype="bfloat16", quantize="int4", show_progress=False)
    assert half.config.quant == spec  # naming the stored mode takes the stored spec (group size 32)
    layers = half.language_model.layers
    assert layers.q_proj.qvalue[...].dtype == np.uint8 and layers.q_proj.qscale[...].dtype == np.float32
    assert half.language_model.embed_tokens[...].dtype == np.dtype("bfloat16")
    ids, mask = reference["input_ids"][2:], reference["attention_mask"][2:]  # the text-only row
    np.testing.assert_array_equal(np.asarray(stored(None, ids, mask)), np.asarray(direct(None, ids, mask)))


def test_what_a_quantized_folder_refuses(int4_folder, tmp_path, capsys):
    for other in ("int8", {"mode": "int4", "group_size": 64}):
        with pytest.raises(CheckpointError, match="cannot be quantized again"):
            owl_jax.from_pretrained(int4_folder, quantize=other, show_progress=False)
    with pytest.raises(CheckpointError, match="adapters cannot be merged"):
        owl_jax.from_pretrained(int4_folder, lora=FIXTURE / "lora-adapter", merge_lora=True, show_progress=False)
    assert convert.main(["export", str(int4_folder), str(tmp_path / "hf"), "--quiet"]) == 2
    assert "holds quantized weights" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    bad = ["import", str(FIXTURE / "checkpoint"), str(tmp_path / "x"), "--quantize", "int4", "--group-size", "3"]
    assert convert.main([*bad, "--quiet"]) == 2
    assert "group_size" in capsys.readouterr().err


def test_adapters_stay_float_over_a_quantized_base(reference):
    """QLoRA inference: the fixture's adapter applied unmerged over int8 kernels."""
    model, _ = owl_jax.from_pretrained(
        FIXTURE / "checkpoint", lora=FIXTURE / "lora-adapter", quantize="int8", show_progress=False
    )
    q_proj = model.language_model.layers.q_proj
    assert q_proj.qvalue[...].dtype == np.int8 and q_proj.lora_a is not None
    logits = np.asarray(model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"]))
    real = reference["attention_mask"].astype(bool)
    error = np.linalg.norm((logits - reference["lora_logits"])[real]) / np.linalg.norm(reference["lora_logits"][real])
    assert error < 0.05


@pytest.mark.parametrize(
    "module, argv",
    [
        ("owl_jax.cli.chat", ["--checkpoint", "c", "--quantize", "int4"]),
        ("owl_jax.cli.eval", ["bench", "--task", "pope", "--data", "d", "--checkpoint", "c", "--quantize", "int4"]),
        ("owl_jax.cli.eval", ["answer", "--checkpoint", "c", "--owleval", "o", "--out", "a", "--quantize", "int8"]),
    ],
)
def test_the_command_lines_take_quantize(module, argv):
    import importlib

    parser = importlib.import_module(module)._parser()
    args = parser.parse_args(argv)
    assert args.quantize == argv[-1]
    with pytest.raises(SystemExit):
        parser.parse_args([*argv[:-1], "int3"])


def test_a_training_run_takes_a_quantized_folder_as_stored(int4_folder):
    from helpers import tiny_training_config
    from owl_jax.config import ConfigError
    from owl_jax.training.run import model_config

    changes = {"model.init": "checkpoint", "model.checkpoint": str(int4_folder)}
    assert model_config(tiny_training_config(**changes, **{"model.quantize": "int4"})).quant.group_size == 32
    with pytest.raises(ConfigError, match="model.checkpoint: .* ask for that quantization"):
        model_config(tiny_training_config(**changes))
