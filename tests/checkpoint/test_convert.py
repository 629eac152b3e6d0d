"""The two-way converter: bit-exact round trips, LoRA handling, and clear errors on bad input."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import owl_jax
from owl_jax.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    export_checkpoint,
    import_checkpoint,
    open_tensor_file,
    weight_files,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
ATOL = 1e-4


def read_all(folder) -> dict:
    files, _ = weight_files(str(folder))
    out = {}
    for path in files:
        with open_tensor_file(path) as f:
            for key in f.keys():
                out[key] = f.get(key).copy()
    return out


def torch_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _raw(value) -> tuple[str, tuple, bytes]:
    """(dtype name, shape, bytes) of a torch tensor or numpy array."""
    if isinstance(value, torch.Tensor):
        return (
            str(value.dtype).replace("torch.", ""),
            tuple(value.shape),
            value.contiguous().view(torch.uint8).numpy().tobytes(),
        )
    return str(value.dtype), tuple(value.shape), np.ascontiguousarray(value).view(np.uint8).tobytes()


def assert_bit_identical(original: dict, exported: dict):
    assert sorted(original) == sorted(exported)
    for key in original:
        assert _raw(original[key]) == _raw(exported[key]), key


@pytest.mark.parametrize("source", ["checkpoint", "checkpoint-sharded"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_round_trip_is_bit_exact(source, fmt, fixture_dir, tmp_path):
    converted = import_checkpoint(str(fixture_dir / source), str(tmp_path / "conv"), show_progress=False)
    meta = json.loads((tmp_path / "conv" / "owl_jax.json").read_text())
    assert meta["param_dtypes"] == ["bfloat16"]  # default keeps the source dtype
    out = export_checkpoint(converted, str(tmp_path / "hf"), fmt=fmt, max_shard_bytes=600_000, show_progress=False)
    files = sorted(os.listdir(out))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    assert index in files and "config.json" in files and "generation_config.json" in files
    original = torch_state(fixture_dir / "checkpoint" / "pytorch_model.bin")
    assert_bit_identical(original, read_all(out))
    # the original config.json is kept as it was
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads(
        (fixture_dir / source / "config.json").read_text()
    )


def test_export_is_loadable_with_strict_key_check_and_shapes(fixture_dir, tmp_path):
    """What the released code's load_state_dict(strict=True) checks: the exact key set and shapes."""
    import_checkpoint(str(fixture_dir / "checkpoint"), str(tmp_path / "conv"), dtype="float32", show_progress=False)
    export_checkpoint(str(tmp_path / "conv"), str(tmp_path / "hf"), fmt="bin", show_progress=False)
    exported = torch_state(tmp_path / "hf" / "pytorch_model.bin")
    original = torch_state(fixture_dir / "checkpoint" / "pytorch_model.bin")
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in original.items()}
    assert all(v.dtype == torch.float32 for v in exported.values())
    for key in original:
        if key.endswith("rotary_emb.inv_freq"):  # regenerated at the export dtype, as the released code builds it
            inv = 1.0 / (10000 ** (torch.arange(0, 24, 2).float() / 24))
            assert torch.equal(exported[key], inv), key
        else:  # bf16 → f32 → file is exact
            assert torch.equal(exported[key], original[key].float()), key


def test_lora_adapter_round_trip_is_bit_exact(fixture_dir, tmp_path):
    import_checkpoint(
        str(fixture_dir / "checkpoint"),
        str(tmp_path / "conv"),
        lora=str(fixture_dir / "lora-adapter"),
        show_progress=False,
    )
    meta = json.loads((tmp_path / "conv" / "owl_jax.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["lora"]["lora_alpha"] == 16
    export_checkpoint(str(tmp_path / "conv"), str(tmp_path / "hf"), fmt="bin", show_progress=False)
    assert_bit_identical(torch_state(fixture_dir / "checkpoint" / "pytorch_model.bin"), read_all(tmp_path / "hf"))
    adapter = tmp_path / "hf" / "adapter"
    assert_bit_identical(
        torch_state(fixture_dir / "lora-adapter" / "adapter_model.bin"), torch_state(adapter / "adapter_model.bin")
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    original = json.loads((fixture_dir / "lora-adapter" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "target_modules", "peft_type"):
        assert config[field] == original[field]


def test_merged_export_equals_w_plus_scaled_ba(fixture_dir, tmp_path):
    import_checkpoint(
        str(fixture_dir / "checkpoint"),
        str(tmp_path / "conv"),
        dtype="float32",
        lora=str(fixture_dir / "lora-adapter"),
        show_progress=False,
    )
    export_checkpoint(str(tmp_path / "conv"), str(tmp_path / "hf"), merge_lora=True, show_progress=False)
    assert not (tmp_path / "hf" / "adapter").exists()
    merged = read_all(tmp_path / "hf")
    base = torch_state(fixture_dir / "checkpoint" / "pytorch_model.bin")
    adapter = torch_state(fixture_dir / "lora-adapter" / "adapter_model.bin")
    prefix = "base_model.model."
    for key in [k for k in adapter if k.endswith("lora_A.weight")]:
        module = key[len(prefix) : -len(".lora_A.weight")]
        a, b = adapter[key].double(), adapter[key.replace("lora_A", "lora_B")].double()
        expected = base[module + ".weight"].double() + (16 / 4) * (b @ a)
        np.testing.assert_allclose(merged[module + ".weight"], expected.numpy(), atol=1e-6, rtol=0)
    untouched = "language_model.model.layers.0.self_attn.k_proj.weight"
    assert np.array_equal(merged[untouched], base[untouched].float().numpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_folder_loads_with_parity(dtype, fixture_dir, tmp_path, reference):
    import_checkpoint(
        str(fixture_dir / "checkpoint-sharded"),
        str(tmp_path / "conv"),
        dtype=dtype,
        lora=str(fixture_dir / "lora-adapter"),
        show_progress=False,
    )
    model, processor = owl_jax.from_pretrained(tmp_path / "conv", show_progress=False)
    assert processor is None  # the fixture's checkpoint folder has no tokenizer.model
    logits = model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"])
    # bf16 storage of the (bf16-released) base is exact; the float32 adapter rounds in bf16
    np.testing.assert_allclose(logits, reference["lora_logits"], atol=ATOL if dtype == "float32" else 0.05, rtol=0)


def test_cli_import_export(fixture_dir, tmp_path):
    run = lambda *a: subprocess.run(
        [sys.executable, str(REPO / "convert_weights.py"), *a], capture_output=True, text=True, cwd=tmp_path
    )
    r = run("import", str(fixture_dir / "checkpoint"), "conv", "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    r = run("export", "conv", "hf", "--format", "bin", "--dtype", "bfloat16", "--quiet")
    assert r.returncode == 0, r.stderr
    assert_bit_identical(
        torch_state(fixture_dir / "checkpoint" / "pytorch_model.bin"),
        torch_state(tmp_path / "hf" / "pytorch_model.bin"),
    )
    r = run("import", str(fixture_dir / "checkpoint"), "conv", "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing left behind that looks complete.


def _import_fails(src, tmp_path, match, error=CheckpointError, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        import_checkpoint(str(src), str(out), show_progress=False, **kwargs)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def _edit_state(folder, edit):
    path = folder / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def test_missing_key_is_named(fixture_copy, tmp_path):
    src = fixture_copy("checkpoint")
    _edit_state(src, lambda s: s.pop("abstractor.vit_eos"))
    _import_fails(src, tmp_path, "missing keys: abstractor.vit_eos", CheckpointMismatchError)


def test_unexpected_key_is_named(fixture_copy, tmp_path):
    src = fixture_copy("checkpoint")
    _edit_state(src, lambda s: s.__setitem__("vision_model.extra.weight", torch.zeros(3)))
    _import_fails(src, tmp_path, "unexpected keys: vision_model.extra.weight", CheckpointMismatchError)


def test_wrong_shape_is_named(fixture_copy, tmp_path):
    src = fixture_copy("checkpoint")
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    _edit_state(src, lambda s: s.__setitem__(key, torch.zeros(255, 96, dtype=torch.bfloat16)))
    _import_fails(src, tmp_path, rf"{key}: checkpoint \(255, 96\) vs model \(256, 96\)", CheckpointMismatchError)


def test_config_that_does_not_match_weights(fixture_copy, tmp_path):
    src = fixture_copy("checkpoint")
    config = json.loads((src / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    config["text_config"]["intermediate_size"] = 300
    (src / "config.json").write_text(json.dumps(config))
    _import_fails(src, tmp_path, "missing keys: language_model.model.layers.2", CheckpointMismatchError)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_truncated_shard_names_the_file(fmt, fixture_copy, fixture_dir, tmp_path):
    if fmt == "bin":
        src = fixture_copy("checkpoint-sharded")
    else:
        import_checkpoint(str(fixture_dir / "checkpoint"), str(tmp_path / "conv"), show_progress=False)
        src = pathlib.Path(
            export_checkpoint(
                str(tmp_path / "conv"), str(tmp_path / "st"), max_shard_bytes=600_000, show_progress=False
            )
        )
    shard = sorted(p for p in src.iterdir() if p.name.endswith(("-of-00002.bin", "-of-00003.safetensors")))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    _import_fails(src, tmp_path, f"{shard.name}.*(truncated|corrupt)")


def test_missing_shard_is_named(fixture_copy, tmp_path):
    src = fixture_copy("checkpoint-sharded")
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    _import_fails(src, tmp_path, "pytorch_model-00002-of-00002.bin")


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_with_code_is_refused(fixture_copy, tmp_path, monkeypatch):
    src = fixture_copy("checkpoint")
    _edit_state(src, lambda s: s.__setitem__("evil", Payload()))
    monkeypatch.chdir(tmp_path)
    _import_fails(src, tmp_path, "refusing to load", UnsafeCheckpointError)
    assert not (tmp_path / "pwned.txt").exists()


def test_lora_adapter_that_does_not_match(fixture_copy, fixture_dir, tmp_path):
    adapter = fixture_copy("lora-adapter")
    state = torch.load(adapter / "adapter_model.bin", weights_only=True)
    key = "base_model.model.language_model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state.pop(key)
    torch.save(state, adapter / "adapter_model.bin")
    _import_fails(
        fixture_dir / "checkpoint",
        tmp_path,
        "missing keys: language_model.model.layers.1.self_attn.v_proj",
        CheckpointMismatchError,
        lora=str(adapter),
    )


def test_existing_output_is_kept_unless_overwrite(fixture_dir, tmp_path):
    out = tmp_path / "conv"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        import_checkpoint(str(fixture_dir / "checkpoint"), str(out), show_progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    import_checkpoint(str(fixture_dir / "checkpoint"), str(out), overwrite=True, show_progress=False)
    assert not (out / "precious.txt").exists() and (out / "owl_jax.json").exists()


def test_sharded_safetensors_folder_loads_with_parity(fixture_dir, tmp_path, reference):
    """from_pretrained also reads the safetensors layout (shards + index) that export writes."""
    import_checkpoint(str(fixture_dir / "checkpoint"), str(tmp_path / "conv"), show_progress=False)
    out = export_checkpoint(str(tmp_path / "conv"), str(tmp_path / "st"), max_shard_bytes=500_000, show_progress=False)
    assert (tmp_path / "st" / "model.safetensors.index.json").exists()
    model, _ = owl_jax.from_pretrained(out, show_progress=False)
    logits = model(reference["pixel_values"], reference["input_ids"], reference["attention_mask"])
    np.testing.assert_allclose(logits, reference["logits"], atol=ATOL, rtol=0)
