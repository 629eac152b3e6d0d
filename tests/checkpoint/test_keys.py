"""The key tables: built from the towers' module names, covering every parameter, each name once."""

import pathlib
import re

import pytest

from helpers import FIXTURE
from owl_jax.checkpoint import abstract_model, leaf_shapes, owl_targets
from owl_jax.checkpoint.keys import abstractor, clip, hf_llama, llama, owl_linear_modules, vision
from owl_jax.checkpoint.keys.targets import LINEAR_BIAS, module_rules
from owl_jax.config import LoRAConfig, OwlConfig

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return OwlConfig.from_hf_config(str(FIXTURE / "checkpoint" / "config.json"))


@pytest.mark.parametrize("table", [vision, abstractor, llama])
def test_every_declared_module_has_a_kind(table):
    assert list(table.KINDS) == list(table.HF_MODULES)


def test_released_targets_cover_every_parameter_once(cfg):
    for with_lora in (False, True):
        model_cfg = cfg.replace(
            lora=LoRAConfig(rank=2, alpha=4, target_modules=r".*\.(q_proj|v_proj|fc1)") if with_lora else None
        )
        shapes = leaf_shapes(abstract_model(model_cfg)[1])
        targets = owl_targets(model_cfg, shapes)
        keys = [t.hf_key for t in targets]
        assert len(keys) == len(set(keys))
        assert {t.path for t in targets} == set(shapes)
        stacked = {t.path: 0 for t in targets if t.layer is not None}
        for t in targets:
            if t.layer is not None:
                stacked[t.path] += 1
        assert all(n == shapes[p][0][0] for p, n in stacked.items())  # one key per layer


def test_released_keys_are_the_module_names_plus_suffixes(cfg):
    shapes = leaf_shapes(abstract_model(cfg)[1])
    keys = {t.hf_key for t in owl_targets(cfg, shapes)}
    assert "vision_model.embeddings.patch_embed.weight" in keys
    assert "vision_model.encoder.layers.0.self_attn.query_key_value.bias" in keys
    assert "abstractor.encoder.layers.1.crossattention.output.mlp.ffn_ln.weight" in keys
    assert {"query_tokens", "abstractor.vit_eos", "vision_model.embeddings.cls_token"} <= keys
    assert "language_model.model.layers.1.self_attn.q_proj.weight" in keys
    assert "language_model.model.layers.1.self_attn.q_proj.bias" not in keys  # LLaMA has no biases
    assert llama.is_rotary_buffer("language_model.model.layers.3.self_attn.rotary_emb.inv_freq")
    assert not llama.is_rotary_buffer("language_model.model.layers.3.self_attn.q_proj.weight")


def test_hf_llama_is_the_released_table_without_its_prefix(cfg):
    released = {r.path: r.hf_key for r in llama.rules()}
    hf = {r.path: r.hf_key for r in hf_llama.rules()}
    assert hf == {p: k[len("language_model.") :] for p, k in released.items()}
    assert "lm_head.weight" not in {r.hf_key for r in hf_llama.rules(tie_word_embeddings=True)}


def test_clip_table_fills_every_vit_leaf(cfg):
    shapes = leaf_shapes(abstract_model(cfg)[1])
    vit = {p for p in shapes if p[0] == "vision_model"}
    assert {t.path for t in clip.targets(cfg.vision, shapes)} == vit
    assert clip.strip_prefix("vision_model.encoder.layers.0.mlp.fc1.weight") == "encoder.layers.0.mlp.fc1.weight"


def test_linear_modules_are_the_lora_candidates():
    linears = owl_linear_modules()
    assert linears["language_model/layers/q_proj"] == "language_model.model.layers.{i}.self_attn.q_proj"
    assert linears["abstractor/visual_fc"] == "abstractor.visual_fc"
    assert "vision_model/pre_layernorm" not in linears and len(linears) == 20


def test_a_table_out_of_step_with_the_module_names_is_refused():
    with pytest.raises(KeyError, match="without a kind"):
        module_rules("vision_model", {"fc1": "a.fc1", "fc2": "a.fc2"}, {"fc1": LINEAR_BIAS})
    with pytest.raises(KeyError, match="not a linear layer"):
        vision.rules(lora_modules=("vision_model/pre_layernorm",))


def test_modeling_does_not_import_checkpoint():
    """The model declares its module names; the converter builds on them, never the other way round."""
    pattern = re.compile(r"^\s*(from|import)\s+owl_jax\.checkpoint", re.MULTILINE)
    offenders = [p.name for p in (REPO / "owl_jax" / "modeling").glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
