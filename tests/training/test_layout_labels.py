"""What trains in each stage kind for the BLOOM and video layouts (the optimizer's labels; nothing compiled)."""

import pytest

from helpers import tiny_training_config
from layout_models import tiny_bloom_config, tiny_video_config
from owl_jax.checkpoint import abstract_model, leaf_shapes
from owl_jax.training.lora_targets import stage_lora
from owl_jax.training.optimizer import TRAIN, VIDEO_ONLY, decay_mask, labels_for, video_only

LAYOUTS = {"bloom": tiny_bloom_config, "video": tiny_video_config}
# The towers each kind trains (stage2: the LoRA adapters, and the abstractor with train_abstractor).
TOWERS = {
    "stage1": {"vision_model", "abstractor"},
    "stage2": {"abstractor"},
    "stage2_full": {"language_model", "abstractor"},
    "text_pretrain": {"language_model"},
    "joint_pretrain": {"vision_model", "abstractor", "language_model"},
}
ADAPTED = {"bloom": {"query_key_value"}, "video": {"q_proj", "v_proj"}}


def model_paths(layout: str, kind: str) -> list[tuple]:
    cfg = LAYOUTS[layout]()
    if kind == "stage2":  # the adapters a stage2 config puts on this text model by default
        cfg = cfg.replace(lora=stage_lora(tiny_training_config().stages.stage2, "stage2", cfg))
    return list(leaf_shapes(abstract_model(cfg)[1]))


@pytest.mark.parametrize("kind", list(TOWERS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_kind_trains_its_towers_in_each_layout(layout, kind):
    paths = model_paths(layout, kind)
    labels = labels_for(paths, kind)
    trained = {p for p, label in labels.items() if label == TRAIN}
    lora = {p for p in paths if p[-1] in ("lora_a", "lora_b")}
    expected = {p for p in paths if p[0] in TOWERS[kind] and p not in lora and not video_only(p)}
    if kind == "stage2":
        assert {(p[0], p[-2]) for p in lora} == {("language_model", m) for m in ADAPTED[layout]}
        expected |= lora
    assert trained == expected
    if layout == "bloom" and "language_model" in TOWERS[kind]:  # the tied embedding is the head too
        assert ("language_model", "word_embeddings") in trained and not any("lm_head" in p for p in paths)
    decay = decay_mask(labels)
    assert not any(decay[p] for p in paths if p[-1] in ("bias", "scale") or p not in trained)


def test_video_only_parameters_train_only_when_asked():
    paths = list(leaf_shapes(abstract_model(tiny_video_config())[1]))
    video = {p for p in paths if video_only(p)}
    assert {p[:3] if p[0] == "vision_model" else p[:2] for p in video} == set(VIDEO_ONLY)
    on = labels_for(paths, "stage1", train_temporal=True)
    assert all(on[p] == TRAIN for p in video)
    assert not any(video_only(p) for p in leaf_shapes(abstract_model(tiny_bloom_config())[1]))
