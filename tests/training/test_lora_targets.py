"""LoRA targets per text model: resolved by `model_type`, named per model in the stage configs, and a pattern
that matches no linear layer of the model refused before any work in one line naming the stage and pattern."""

import importlib
import re
import signal

import pytest

from helpers import tiny_training_config
from layout_models import FIXTURES, checkpoint_with_tokenizer, tiny_bloom_config, tiny_video_config
from owl_jax.config import TEXT_MODEL_TYPES, ConfigError, OwlConfig
from owl_jax.training import validation
from owl_jax.training.lora_targets import linear_modules, stage_lora, stage_loras
from owl_jax.training.schema import LORA_TARGETS, lora_config

QKV = r".*language_model.*\.query_key_value"
QV = r".*language_model.*\.(q_proj|v_proj)"


def adapted(cfg: OwlConfig, lora) -> set[str]:
    """The HF names (layer 0 of stacked towers) of the linear layers `lora` puts adapters on."""
    return {m.hf_name for m in linear_modules(cfg) if lora.matches(m.hf_name) and ".1." not in m.hf_name}


def stage2(config_changes=None, **lora):
    config = tiny_training_config(**(config_changes or {}))
    config.stages.stage2.lora = lora_config(rank=4, alpha=8, dropout=0.0, **lora)
    return config


def test_every_text_model_has_default_targets():
    assert set(LORA_TARGETS) == set(TEXT_MODEL_TYPES)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (tiny_bloom_config(), {"language_model.transformer.h.0.self_attention.query_key_value"}),
        (
            tiny_video_config(),
            {"language_model.model.layers.0.self_attn.q_proj", "language_model.model.layers.0.self_attn.v_proj"},
        ),
    ],
    ids=["bloom", "video"],
)
def test_auto_targets_follow_the_text_model(cfg, expected):
    config = stage2()
    lora = stage_lora(config.stages.stage2, "stage2", cfg)
    assert adapted(cfg, lora) == expected  # never the ViT's query_key_value, nor the temporal projections


def test_per_model_and_explicit_targets():
    by_model = stage2(targets_by_model={"bloom": r".*language_model.*\.(query_key_value|dense)"})
    bloom = stage_lora(by_model.stages.stage2, "stage2", tiny_bloom_config())
    assert {n.rsplit(".", 1)[-1] for n in adapted(tiny_bloom_config(), bloom)} == {"query_key_value", "dense"}
    llama = stage_lora(by_model.stages.stage2, "stage2", tiny_video_config())
    assert llama.target_modules == QV  # the other models keep their defaults
    explicit = stage2(targets=r".*language_model.*\.dense_4h_to_h")  # one pattern for every text model
    lora = stage_lora(explicit.stages.stage2, "stage2", tiny_bloom_config())
    assert adapted(tiny_bloom_config(), lora) == {"language_model.transformer.h.0.mlp.dense_4h_to_h"}


@pytest.mark.parametrize(
    "lora, message",
    [
        (
            dict(targets_by_model={"bloom": QV}),
            f"stages.stage2.lora.targets_by_model.bloom={QV!r} matches no linear layer of this bloom model "
            "(its language model's: dense, dense_4h_to_h, dense_h_to_4h, query_key_value)",
        ),
        (
            dict(targets=QV),
            f"stages.stage2.lora.targets={QV!r} matches no linear layer of this bloom model",
        ),
        (
            dict(targets=r".*language_model.*h\.0\.self_attention\.query_key_value"),
            r"stages.stage2.lora.targets='.*language_model.*h\\.0\\.self_attention\\.query_key_value' matches only "
            "some layers of language_model/layers/query_key_value",
        ),
    ],
    ids=["by-model", "explicit", "some-layers"],
)
def test_pattern_matching_no_layer_is_refused_in_one_line(lora, message):
    config = stage2(**lora)
    with pytest.raises(ConfigError) as raised:
        stage_loras(config, tiny_bloom_config())
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_run_refuses_a_bloom_checkpoint_with_llama_targets_before_any_work(tmp_path):
    from owl_jax.training.run import run

    checkpoint = checkpoint_with_tokenizer("bloom", tmp_path / "bloomz")
    changes = {"model.init": "checkpoint", "model.checkpoint": str(checkpoint), "workdir": str(tmp_path / "w")}
    config = stage2(changes, targets_by_model={"bloom": QV})
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match=f"^{re.escape(f'stages.stage2.lora.targets_by_model.bloom={QV!r}')}"):
        run(config)
    assert not (tmp_path / "w").exists() and signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize(
    "lora, message",
    [
        (dict(targets="q_proj|(v_proj"), r"stages.stage2.lora.targets='q_proj\|\(v_proj' is not a regular expression"),
        (dict(targets_by_model={"blom": QKV}), "unknown config field stages.stage2.lora.targets_by_model.blom; did"),
        (dict(targets_by_model={"bloom": ""}), "stages.stage2.lora.targets_by_model.bloom='' must be a regular"),
    ],
)
def test_malformed_targets_are_refused_by_validation(lora, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        validation.validate(stage2(**lora))


@pytest.mark.parametrize("name", ["default", "stage2_instruct"])
@pytest.mark.parametrize("layout", ["bloom", "video"])
def test_shipped_stage2_configs_name_targets_for_each_text_model(name, layout):
    config = importlib.import_module(f"configs.{name}").get_config()
    cfg = OwlConfig.from_hf_config(FIXTURES[layout] / "checkpoint")
    assert "auto" == config.stages.stage2.lora.targets
    assert set(config.stages.stage2.lora.targets_by_model) == set(TEXT_MODEL_TYPES)
    lora = stage_lora(config.stages.stage2, "stage2", cfg)
    assert adapted(cfg, lora) and all(n.startswith("language_model.") for n in adapted(cfg, lora))
