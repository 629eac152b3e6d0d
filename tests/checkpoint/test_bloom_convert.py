"""The converter on the BLOOMZ layout: bit-exact round trips (tied head written twice, fused QKV and its
adapter kept fused), the head read from either key, every key accounted for, and clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import BLOOMZ
from owl_jax.checkpoint import (
    CheckpointMismatchError,
    export_checkpoint,
    import_checkpoint,
    load_checkpoint,
    open_tensor_file,
    weight_files,
)
from owl_jax.cli.convert import main as owl_convert

EMBEDDINGS = "language_model.transformer.word_embeddings.weight"
HEAD = "language_model.lm_head.weight"
QKV = "language_model.transformer.h.{i}.self_attention.query_key_value"


def read_all(folder, files=None) -> dict:
    """Every tensor of a weights folder (or of the given `files`) as numpy arrays."""
    out = {}
    for path in files or weight_files(str(folder))[0]:
        with open_tensor_file(str(path)) as f:
            for key in f.keys():
                out[key] = f.get(key).copy()
    return out


def torch_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _raw(value) -> tuple[str, tuple, bytes]:
    if isinstance(value, torch.Tensor):
        value = value.contiguous()
        return str(value.dtype).replace("torch.", ""), tuple(value.shape), value.view(torch.uint8).numpy().tobytes()
    return str(value.dtype), tuple(value.shape), np.ascontiguousarray(value).view(np.uint8).tobytes()


def assert_bit_identical(original: dict, exported: dict):
    assert sorted(original) == sorted(exported)
    for key in original:
        assert _raw(original[key]) == _raw(exported[key]), key


def _copy(name: str, tmp_path):
    dst = tmp_path / name
    shutil.copytree(BLOOMZ / name, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


@pytest.mark.parametrize("source, fmt", [("checkpoint-sharded", "bin"), ("checkpoint", "safetensors")])
def test_round_trip_is_bit_exact_with_the_adapter(source, fmt, tmp_path):
    index = json.loads((BLOOMZ / "checkpoint-sharded" / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert index[EMBEDDINGS] != index[HEAD]  # the tied pair is split over the two shards
    converted = import_checkpoint(
        str(BLOOMZ / source), str(tmp_path / "conv"), lora=str(BLOOMZ / "lora-adapter"), show_progress=False
    )
    out = export_checkpoint(converted, str(tmp_path / "hf"), fmt=fmt, max_shard_bytes=400_000, show_progress=False)
    original = torch_state(BLOOMZ / "checkpoint" / "pytorch_model.bin")
    exported = read_all(out)
    assert len(weight_files(out)[0]) > 1
    assert_bit_identical(original, exported)  # 109 keys: both head keys, no rotary buffers
    assert_bit_identical(
        torch_state(BLOOMZ / "lora-adapter" / "adapter_model.bin"),
        read_all(None, list((tmp_path / "hf" / "adapter").glob("adapter_model.*"))),
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads(
        (BLOOMZ / source / "config.json").read_text()
    )


def test_cli_round_trip_and_merged_export(tmp_path):
    assert owl_convert(["import", str(BLOOMZ / "checkpoint"), str(tmp_path / "conv"), "--quiet"]) == 0
    assert owl_convert(["export", str(tmp_path / "conv"), str(tmp_path / "hf"), "--format", "bin", "--quiet"]) == 0
    assert_bit_identical(torch_state(BLOOMZ / "checkpoint" / "pytorch_model.bin"), read_all(tmp_path / "hf"))
    # merged: W + alpha/r · B @ A on the fused (3H, H) matrix, in its head-interleaved row order
    args = ["--lora", str(BLOOMZ / "lora-adapter"), "--merge-lora", "--dtype", "float32", "--quiet"]
    assert owl_convert(["import", str(BLOOMZ / "checkpoint"), str(tmp_path / "merged"), *args]) == 0
    assert owl_convert(["export", str(tmp_path / "merged"), str(tmp_path / "hf-merged"), "--quiet"]) == 0
    merged = read_all(tmp_path / "hf-merged")
    base = torch_state(BLOOMZ / "checkpoint" / "pytorch_model.bin")
    adapter = torch_state(BLOOMZ / "lora-adapter" / "adapter_model.bin")
    for i in range(2):
        a = adapter[f"base_model.model.{QKV.format(i=i)}.lora_A.weight"].double()
        b = adapter[f"base_model.model.{QKV.format(i=i)}.lora_B.weight"].double()
        expected = base[QKV.format(i=i) + ".weight"].double() + (16 / 4) * (b @ a)
        np.testing.assert_allclose(merged[QKV.format(i=i) + ".weight"], expected.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(merged[HEAD], merged[EMBEDDINGS])


@pytest.mark.parametrize("kept", [EMBEDDINGS, HEAD])
def test_either_key_of_the_tied_head_fills_the_embeddings(kept, tmp_path):
    src = _copy("checkpoint", tmp_path)
    state = torch_state(src / "pytorch_model.bin")
    expected = state[EMBEDDINGS].float().numpy()
    state.pop(HEAD if kept == EMBEDDINGS else EMBEDDINGS)
    torch.save(state, src / "pytorch_model.bin")
    loaded = load_checkpoint(str(src), on_host=True, show_progress=False)
    assert ("language_model", "lm_head") not in {p[:2] for p in loaded.leaves}
    np.testing.assert_array_equal(loaded.leaves[("language_model", "word_embeddings")].astype(np.float32), expected)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.pop("language_model.transformer.ln_f.bias"), "missing keys: language_model.transformer.ln_f.bias"),
        (
            lambda s: s.__setitem__("language_model.transformer.h.0.self_attention.rotary_emb.inv_freq", torch.ones(8)),
            "unexpected keys: language_model.transformer.h.0.self_attention.rotary_emb.inv_freq",
        ),
        (
            lambda s: s.__setitem__(HEAD, torch.zeros(1000, 96, dtype=torch.bfloat16)),
            r"language_model.lm_head.weight \(1000, 96\) should be a copy of .*word_embeddings.weight \(1024, 96\)",
        ),
    ],
)
def test_bad_checkpoints_name_the_key(edit, match, tmp_path):
    src = _copy("checkpoint", tmp_path)
    state = torch_state(src / "pytorch_model.bin")
    edit(state)
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match=match):
        import_checkpoint(str(src), str(tmp_path / "out"), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_key_tables_cover_every_parameter_once():
    from owl_jax.checkpoint import abstract_model, leaf_shapes, owl_targets
    from owl_jax.checkpoint.keys import bloom, hf_bloom, owl_linear_modules
    from owl_jax.config import LoRAConfig, OwlConfig

    assert list(bloom.KINDS) == list(bloom.HF_MODULES)
    cfg = OwlConfig.from_hf_config(BLOOMZ / "checkpoint").replace(
        lora=LoRAConfig(rank=4, alpha=16, target_modules=r".*language_model.*\.query_key_value")
    )
    shapes = leaf_shapes(abstract_model(cfg)[1])
    targets = owl_targets(cfg, shapes)
    keys = [t.hf_key for t in targets]
    assert len(keys) == len(set(keys)) and {t.path for t in targets} == set(shapes)
    # BLOOM's 6 + 12·L keys but the tied head (read from the embeddings), and an adapter's A and B per layer
    assert HEAD not in keys and len([k for k in keys if k.startswith("language_model.")]) == 6 + 12 * 2 - 1 + 2 * 2
    copies = owl_targets(cfg, shapes, include_copies=True, include_lora=False)
    assert {t.path for t in copies if t.hf_key in (HEAD, EMBEDDINGS)} == {("language_model", "word_embeddings")}
    released = {r.path: r.hf_key for r in bloom.rules()}
    assert {r.path: r.hf_key for r in hf_bloom.rules()} == {
        p: k.removeprefix("language_model.").removeprefix("transformer.") for p, k in released.items()
    }
    linears = owl_linear_modules(text_model="bloom")
    assert linears["language_model/layers/query_key_value"] == QKV
