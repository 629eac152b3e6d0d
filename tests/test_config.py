"""Typed configs: the released config.json layout both ways, presets, and clear errors."""

import importlib
import json

import pytest

from owl_jax.config import ConfigError, LoRAConfig, OwlConfig


def test_reads_released_layout(fixture_dir):
    cfg = OwlConfig.from_hf_config(fixture_dir / "checkpoint")
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.num_positions) == (64, 2, 257)
    assert (cfg.abstractor.intermediate_size, cfg.num_query_tokens, cfg.image_tokens) == (176, 8, 9)
    assert (cfg.text.vocab_size, cfg.text.head_dim, cfg.text.rms_norm_eps) == (1024, 24, 1e-6)
    assert cfg.vision.hidden_act == "quick_gelu" and cfg.abstractor.layer_norm_eps == 1e-6


def test_round_trip_through_hf_dict(fixture_dir):
    cfg = OwlConfig.from_hf_config(fixture_dir / "checkpoint")
    again = OwlConfig.from_hf_config(json.loads(json.dumps(cfg.to_hf_config())))
    assert again == cfg


def test_presets():
    tiny = importlib.import_module("configs.tiny").get_config()
    big = importlib.import_module("configs.mplug_owl_llama_7b").get_config()
    assert tiny.image_tokens == 9 and big.image_tokens == 65
    assert (big.text.num_layers, big.text.hidden_size, big.vision.num_layers) == (32, 4096, 24)


def test_tiny_preset_is_the_fixture_layout(fixture_dir):
    tiny = importlib.import_module("configs.tiny").get_config()
    assert tiny == OwlConfig.from_hf_config(fixture_dir / "checkpoint")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.pop("vision_config"), "MplugOwlConfig layout"),
        (lambda d: d["text_config"].update(num_attention_heads=5), "not divisible"),
        (lambda d: d["visual_abstractor_config"].update(encoder_hidden_size=32), "encoder_hidden_size"),
        (lambda d: d["text_config"].update(model_type="gpt_neox"), "only LLaMA and BLOOM"),
        (lambda d: d["text_config"].update(rope_scaling={"type": "linear", "factor": 2.0}), "not supported"),
    ],
)
def test_bad_configs_are_rejected(edit, match, fixture_dir):
    d = json.loads((fixture_dir / "checkpoint" / "config.json").read_text())
    edit(d)
    with pytest.raises(ConfigError, match=match):
        OwlConfig.from_hf_config(d)


def test_lora_target_matching():
    regex = LoRAConfig(target_modules=r".*language_model.*\.(q_proj|v_proj)")
    assert regex.matches("language_model.model.layers.3.self_attn.q_proj")
    assert not regex.matches("language_model.model.layers.3.self_attn.k_proj")
    names = LoRAConfig(target_modules=("q_proj", "dense"))
    assert names.matches("language_model.model.layers.0.self_attn.q_proj")
    assert names.matches("vision_model.encoder.layers.1.self_attn.dense")
    assert not names.matches("abstractor.visual_fc")
    assert LoRAConfig(rank=8, alpha=32).scale == 4.0


def test_stage_prepare_frozen_choices():
    from owl_jax.training.run import _prepare_frozen

    assert [_prepare_frozen("stage1", v) for v in ("auto", "on", "off")] == [None, True, False]
    with pytest.raises(ValueError, match="stages.stage2.prepare_frozen must be one of"):
        _prepare_frozen("stage2", "yes")
