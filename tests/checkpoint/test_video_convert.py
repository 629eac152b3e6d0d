"""The converter on the released video layout: every key accounted for, bit-exact round trips (base weights,
LoRA adapter, trainer checkpoint), merges, and a clear error for a video checkpoint read as the image layout."""

import json
import warnings

import numpy as np
import pytest
import torch

import owl_jax
from helpers import VIDEO_FIXTURE
from owl_jax.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    abstract_model,
    export_checkpoint,
    import_checkpoint,
    leaf_shapes,
    load_checkpoint,
    load_converted_leaves,
    owl_targets,
)
from owl_jax.checkpoint.keys import is_rotary_buffer, is_video_key
from owl_jax.checkpoint.released import open_released
from owl_jax.config import LoRAConfig, OwlConfig

PEFT_PREFIX = "base_model.model."
VIDEO_ONLY = 3 + 8 * 2  # temporal_query_tokens, temporal_visual_fc.{weight,bias}, 8 per ViT layer


def torch_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def raw(t: torch.Tensor) -> tuple:
    return str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes()


def assert_bit_identical(original: dict, exported: dict) -> None:
    assert sorted(original) == sorted(exported)
    for key in original:
        assert raw(original[key]) == raw(exported[key]), key


@pytest.fixture(scope="module")
def original() -> dict:
    return torch_state(VIDEO_FIXTURE / "checkpoint" / "pytorch_model.bin")


@pytest.fixture(scope="module")
def cfg() -> OwlConfig:
    return OwlConfig.from_hf_config(VIDEO_FIXTURE / "checkpoint")


def test_every_key_of_the_video_checkpoint_is_accounted_for(cfg, original):
    targets = owl_targets(cfg, leaf_shapes(abstract_model(cfg)[1]))
    expected = {t.hf_key: t.hf_shape for t in targets}
    stored = {k: tuple(v.shape) for k, v in original.items() if not is_rotary_buffer(k)}
    assert expected == stored
    assert sum(is_video_key(k) for k in original) == VIDEO_ONLY
    assert expected["vision_model.encoder.layers.1.temporal.down_proj.weight"] == (32, 64, 1, 1, 1)
    assert expected["vision_model.encoder.layers.0.temporal.conv.weight"] == (32, 1, 3, 1, 1)


def test_adapters_on_the_temporal_convolutions_take_peft_conv3d_shapes(cfg):
    lora_cfg = cfg.replace(lora=LoRAConfig(rank=2, alpha=4, target_modules=("up_proj", "temporal_visual_fc")))
    targets = {t.hf_key: t.hf_shape for t in owl_targets(lora_cfg, leaf_shapes(abstract_model(lora_cfg)[1]))}
    assert targets["vision_model.encoder.layers.1.temporal.up_proj.lora_A.weight"] == (2, 32, 1, 1, 1)
    assert targets["vision_model.encoder.layers.1.temporal.up_proj.lora_B.weight"] == (64, 2, 1, 1, 1)
    assert targets["abstractor.temporal_visual_fc.lora_A.weight"] == (2, 64)
    assert targets["language_model.model.layers.0.mlp.up_proj.lora_A.weight"] == (2, 96)


@pytest.mark.parametrize("source", ["checkpoint", "checkpoint-sharded"])
def test_round_trip_is_bit_exact(source, original, tmp_path):
    conv = import_checkpoint(str(VIDEO_FIXTURE / source), str(tmp_path / "conv"), show_progress=False)
    out = export_checkpoint(conv, str(tmp_path / "hf"), fmt="bin", max_shard_bytes=600_000, show_progress=False)
    exported = {}
    for shard in sorted((tmp_path / "hf").glob("pytorch_model-*.bin")):
        exported.update(torch_state(shard))
    assert_bit_identical(original, exported)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == json.loads((VIDEO_FIXTURE / source / "config.json").read_text())
    assert OwlConfig.from_hf_config(out).video


@pytest.mark.parametrize("lora", ["lora-adapter", "lora-trainer-checkpoint"])
def test_lora_round_trip_is_bit_exact(lora, original, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*no adapter_config.json", UserWarning)  # the trainer checkpoint's alpha
        conv = import_checkpoint(
            str(VIDEO_FIXTURE / "checkpoint"),
            str(tmp_path / "conv"),
            lora=str(VIDEO_FIXTURE / lora),
            show_progress=False,
        )
    export_checkpoint(conv, str(tmp_path / "hf"), fmt="bin", show_progress=False)
    assert_bit_identical(original, torch_state(tmp_path / "hf" / "pytorch_model.bin"))
    exported = torch_state(tmp_path / "hf" / "adapter" / "adapter_model.bin")
    if lora == "lora-adapter":
        adapter = torch_state(VIDEO_FIXTURE / lora / "adapter_model.bin")
    else:  # the trainer's full PeftModel state: its adapter keys, named as peft's adapter file names them
        state = torch_state(VIDEO_FIXTURE / lora / "pytorch_model.bin")
        adapter = {k.replace(".default.weight", ".weight"): v for k, v in state.items() if ".lora_" in k}
        assert {k[len(PEFT_PREFIX) :] for k in state if ".lora_" not in k} == set(original)  # the base weights
    assert len(adapter) == 8
    assert_bit_identical(adapter, exported)


def test_merged_export_equals_w_plus_scaled_ba(original, tmp_path):
    conv = import_checkpoint(
        str(VIDEO_FIXTURE / "checkpoint-sharded"),
        str(tmp_path / "conv"),
        dtype="float32",
        lora=str(VIDEO_FIXTURE / "lora-adapter"),
        merge_lora=True,
        show_progress=False,
    )
    export_checkpoint(conv, str(tmp_path / "hf"), fmt="bin", show_progress=False)
    assert not (tmp_path / "hf" / "adapter").exists()
    merged = torch_state(tmp_path / "hf" / "pytorch_model.bin")
    adapter = torch_state(VIDEO_FIXTURE / "lora-adapter" / "adapter_model.bin")
    for key in [k for k in adapter if k.endswith("lora_A.weight")]:
        module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        a, b = adapter[key].double(), adapter[key.replace("lora_A", "lora_B")].double()
        expected = original[module + ".weight"].double() + (16 / 4) * (b @ a)
        np.testing.assert_allclose(merged[module + ".weight"], expected.numpy(), atol=1e-6, rtol=0)
    for key in [k for k in original if is_video_key(k)]:
        assert torch.equal(merged[key], original[key].float()), key


def test_converted_folder_loads_with_parity(tmp_path):
    with np.load(VIDEO_FIXTURE / "reference.npz") as data:
        ref = {k: data[k] for k in data.files}
    conv = import_checkpoint(
        str(VIDEO_FIXTURE / "checkpoint"),
        str(tmp_path / "conv"),
        lora=str(VIDEO_FIXTURE / "lora-adapter"),
        show_progress=False,
    )
    model, _ = owl_jax.from_pretrained(conv, show_progress=False)
    assert model.config.video and model.abstractor.temporal_visual_fc is not None
    logits = model(ref["pixel_values"], ref["input_ids"], ref["attention_mask"], ref["video_pixel_values"])
    real = ref["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], ref["lora_logits"][real], atol=1e-4, rtol=0)


def test_video_checkpoint_read_as_the_image_layout_names_the_unexpected_keys(cfg, tmp_path):
    image_cfg = cfg.replace(video=False)
    for folder in ("checkpoint", "checkpoint-sharded"):
        with pytest.raises(CheckpointMismatchError) as error:
            with open_released(str(VIDEO_FIXTURE / folder), image_cfg, show_progress=False):
                pass
        message = str(error.value)
        assert "\n" not in message and "image layout" in message
        assert "temporal_query_tokens" in message and "abstractor.temporal_visual_fc.bias" in message
    conv = import_checkpoint(str(VIDEO_FIXTURE / "checkpoint"), str(tmp_path / "conv"), show_progress=False)
    with pytest.raises(CheckpointError, match=r"unexpected \[.*temporal_query_tokens") as error:
        load_converted_leaves(conv, leaf_shapes(abstract_model(image_cfg)[1]))
    assert "\n" not in str(error.value)


def test_the_abstractor_width_comes_from_the_weights(tmp_path):
    """A config whose `intermediate_size` the video rule maps elsewhere (4096 → 2816) still loads the 256-wide
    weights, from the released folder and from a converted one."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        (src / name).write_bytes((VIDEO_FIXTURE / "checkpoint" / name).read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["visual_abstractor_config"]["intermediate_size"] = 4096
    (src / "config.json").write_text(json.dumps(config))
    assert OwlConfig.from_hf_config(src).abstractor.intermediate_size == 2816
    conv = import_checkpoint(str(src), str(tmp_path / "conv"), show_progress=False)
    for folder in (src, conv):
        loaded = load_checkpoint(str(folder), on_host=True, show_progress=False)
        assert loaded.config.abstractor.intermediate_size == 256
        assert loaded.leaves[("abstractor", "layers", "w1", "kernel")].shape == (2, 64, 256)
