"""BLOOM's `text_config` (the BLOOMZ layout) both ways, and one-line errors naming the field."""

import json

import pytest

from helpers import BLOOMZ
from owl_jax.config import ConfigError, OwlConfig, TextConfig


def _released() -> dict:
    return json.loads((BLOOMZ / "checkpoint" / "config.json").read_text())


def test_reads_the_bloomz_layout():
    d = _released()
    assert (d["num_hidden_layers"], d["num_attention_heads"]) == ("n_layer", "n_head")  # strings, ignored
    cfg = OwlConfig.from_hf_config(BLOOMZ / "checkpoint")
    t = cfg.text
    assert (t.model_type, t.vocab_size, t.hidden_size, t.num_layers, t.num_heads) == ("bloom", 1024, 96, 2, 6)
    assert (t.num_kv_heads, t.head_dim, t.intermediate_size, t.layer_norm_eps) == (6, 16, 384, 1e-5)
    assert t.tie_word_embeddings and t.hidden_act == "bloom_gelu"
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (1, 2, 2)  # pad unset: generation pads with EOS
    assert (cfg.vision.hidden_size, cfg.abstractor.intermediate_size, cfg.image_tokens) == (64, 176, 9)


def test_round_trip_through_hf_dict():
    cfg = OwlConfig.from_hf_config(BLOOMZ / "checkpoint")
    hf = json.loads(json.dumps(cfg.to_hf_config()))
    text = hf["text_config"]
    assert (text["model_type"], text["n_layer"], text["n_head"], text["hidden_size"]) == ("bloom", 2, 6, 96)
    assert text["tie_word_embeddings"] and not text["apply_residual_connection_post_layernorm"]
    assert OwlConfig.from_hf_config(hf) == cfg


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"n_head": 7}, r"text_config\.hidden_size 96 is not divisible by text_config\.n_head 7"),
        ({"apply_residual_connection_post_layernorm": True}, r"text_config\.apply_residual_connection_post_layernorm"),
        ({"pretraining_tp": 4}, r"text_config\.pretraining_tp must be 1"),
        ({"slow_but_exact": True}, r"text_config\.slow_but_exact must be false"),
        ({"layer_norm_epsilon": -1.0}, r"text_config\.layer_norm_epsilon must be a positive number"),
    ],
)
def test_unsupported_bloom_configs_are_refused_in_one_line(edit, match):
    d = _released()
    d["text_config"].update(edit)
    with pytest.raises(ConfigError, match=match) as err:
        OwlConfig.from_hf_config(d)
    assert "\n" not in str(err.value)


def test_validate_names_the_field_of_a_bad_bloom_text_config():
    bloom = dict(model_type="bloom", hidden_act="bloom_gelu", vocab_size=64)
    good = TextConfig(hidden_size=96, intermediate_size=384, num_heads=6, num_kv_heads=6, **bloom)
    OwlConfig(text=good).validate()
    cases = [
        (dict(hidden_size=100, intermediate_size=400), "text hidden_size 100 is not divisible by num_heads 6"),
        (dict(hidden_act="silu"), "text hidden_act 'silu': BLOOM uses bloom_gelu"),
        (dict(intermediate_size=256), "text intermediate_size 256"),
        (dict(num_kv_heads=2), "text num_kv_heads 2"),
        (dict(model_type="gpt2"), "text model_type 'gpt2'"),
    ]
    for changes, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            OwlConfig(text=TextConfig(**{**good.__dict__, **changes})).validate()
        assert "\n" not in str(err.value)
