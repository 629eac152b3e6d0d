"""The FLOP accounting behind MFU for BLOOM (fused QKV, 4H MLP, tied head) and the video layout (temporal
modules, temporal queries), checked against the matmuls of the traced programs (nothing compiled)."""

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import OPTIM, one_device_mesh, tiny_batch, tiny_params
from layout_models import tiny_bloom_config, tiny_video_config
from owl_jax.config import LoRAConfig
from owl_jax.modeling import Owl
from owl_jax.training.flops import forward_flops, jaxpr_matmul_flops, tower_matmul_params, train_step_flops
from owl_jax.training.run import adapt_params
from owl_jax.training.trainer import Trainer

ROWS, LENGTH, SLOTS = 4, 16, 2
QKV = LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=r".*language_model.*\.query_key_value")


@pytest.mark.parametrize(
    "make, stage, lora",
    [
        (tiny_bloom_config, "stage1", None),
        (tiny_bloom_config, "stage2", QKV),
        (tiny_bloom_config, "stage2_full", None),
        (tiny_video_config, "stage1", None),  # images skip the temporal modules and temporal queries
    ],
    ids=["bloom-stage1", "bloom-stage2", "bloom-stage2_full", "video-stage1"],
)
def test_train_step_flops_match_the_traced_matmuls(make, stage, lora):
    cfg = make(lora=lora)
    trainer = Trainer(cfg, stage=stage, mesh=one_device_mesh(), optim=OPTIM, total_steps=3)
    state = trainer.init_state(adapt_params(tiny_params(cfg), cfg, None, seed=0), seed=0)
    batch = trainer.global_batch(tiny_batch(rows=ROWS, length=LENGTH, slots=SLOTS))
    traced = jaxpr_matmul_flops(jax.make_jaxpr(trainer._step)(state, batch))
    counted = train_step_flops(cfg, stage, rows=ROWS, seq_len=LENGTH, images=ROWS * SLOTS, causal_half=False)
    assert counted == pytest.approx(traced, rel=0.01)


def test_bloom_counts_fused_qkv_a_4h_mlp_and_the_tied_head():
    cfg = tiny_bloom_config(lora=QKV)
    t = cfg.text
    n = tower_matmul_params(cfg)
    assert n["llm"] == t.num_layers * (3 * 24 * 24 + 24 * 24 + 2 * 24 * 96) + 24 * t.vocab_size
    assert n["lora"] == t.num_layers * 4 * (24 + 3 * 24)  # r · (in + out) on each layer's query_key_value
    assert n["temporal"] == n["temporal_fc"] == 0


def test_forward_flops_with_videos_match_the_traced_matmuls():
    cfg = tiny_video_config()
    model = Owl(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    frames, tokens = 3, cfg.image_tokens
    ids = np.full((2, LENGTH), 7, np.int32)
    ids[:, 0] = 1
    ids[0, 1 : 1 + tokens] = -1  # row 0: an image, then a video
    ids[0, 6 : 6 + tokens] = -2
    ids[1, 2 : 2 + tokens] = -2  # row 1: a video
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(1, 3, 32, 32)).astype(np.float32)
    videos = rng.normal(size=(2, 3, frames, 32, 32)).astype(np.float32)

    def forward(state, pixels, ids, videos):
        return nnx.merge(graphdef, state).forward(pixels, ids, video_pixel_values=videos, right_padded=True)

    traced = jaxpr_matmul_flops(jax.make_jaxpr(forward)(state, pixels, ids, videos))
    counted = forward_flops(cfg, rows=2, seq_len=LENGTH, images=1, videos=2, frames=frames, causal_half=False)
    assert counted == pytest.approx(traced, rel=0.01)
    without_temporal = forward_flops(cfg, rows=2, seq_len=LENGTH, images=3, causal_half=False)
    assert counted > without_temporal  # more frames, the temporal projections and twice the queries
