"""The released video layout's config.json: told apart from the image layout, read and written both ways."""

import dataclasses
import json

import pytest

from helpers import FIXTURE, VIDEO_FIXTURE
from owl_jax.config import ConfigError, OwlConfig
from owl_jax.hf_video_layout import is_video_layout, released_intermediate_size, video_swiglu_width


def video_config_dict() -> dict:
    return json.loads((VIDEO_FIXTURE / "checkpoint" / "config.json").read_text())


def test_the_layout_comes_from_config_json():
    video = OwlConfig.from_hf_config(VIDEO_FIXTURE / "checkpoint")
    assert video.video and not OwlConfig.from_hf_config(FIXTURE / "checkpoint").video
    # the top-level LM attributes describe LLaMA, not the ViT (64) or the abstractor (256)
    assert (video.text.hidden_size, video.vision.hidden_size, video.abstractor.intermediate_size) == (96, 64, 256)
    assert (video.num_query_tokens, video.image_tokens) == (8, 9)
    # the image package's BLOOMZ config has top-level "n_layer"/"n_head" strings, which mark nothing
    bloomz = json.loads((FIXTURE.parent / "mplug_owl_bloomz_tiny" / "checkpoint" / "config.json").read_text())
    assert "num_hidden_layers" in bloomz and not is_video_layout(bloomz, "config.json")


@pytest.mark.parametrize("config_size, width", [(4096, 2816), (176, 256), (256, 256), (512, 512), (2816, 2816)])
def test_abstractor_swiglu_width_rule_of_the_video_package(config_size, width):
    assert video_swiglu_width(config_size) == width
    d = video_config_dict()
    d["visual_abstractor_config"]["intermediate_size"] = config_size
    assert OwlConfig.from_hf_config(d).abstractor.intermediate_size == width


@pytest.mark.parametrize("width", [256, 1024, 2816])
def test_video_config_round_trips_through_the_released_layout(width):
    cfg = OwlConfig.from_hf_config(video_config_dict())
    cfg = cfg.replace(abstractor=dataclasses.replace(cfg.abstractor, intermediate_size=width))
    hf = json.loads(json.dumps(cfg.to_hf_config()))
    for key in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers", "rms_norm_eps"):
        assert hf[key] == hf["text_config"][key]
    assert video_swiglu_width(hf["visual_abstractor_config"]["intermediate_size"]) == width
    assert OwlConfig.from_hf_config(hf) == cfg
    image = OwlConfig.from_hf_config(json.loads(json.dumps(cfg.replace(video=False).to_hf_config())))
    assert not image.video and "vocab_size" not in image.to_hf_config()


def test_inconsistent_or_unbuildable_video_configs_are_refused():
    d = video_config_dict()
    d["hidden_size"] = 64
    with pytest.raises(ConfigError, match="top-level hidden_size 64 differs from text_config.hidden_size 96"):
        OwlConfig.from_hf_config(d)
    with pytest.raises(ConfigError, match="cannot build an abstractor SwiGLU of width 300"):
        released_intermediate_size(300)
