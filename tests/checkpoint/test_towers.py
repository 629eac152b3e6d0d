"""A fresh model from separate towers: tiny HF CLIP / LLaMA checkpoints → `init_from_towers` → same outputs."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from owl_jax.checkpoint import (
    CheckpointMismatchError,
    abstract_model,
    assemble,
    config_from_towers,  # noqa: E402
    init_from_towers,
    leaf_shapes,
)
from owl_jax.config import AbstractorConfig  # noqa: E402

TOL = 1e-5
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=14,
    hidden_act="quick_gelu",
)
LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
)


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights, with every 1-D parameter (norms, biases, class embedding) moved off its 1/0 default."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _save_bin(model: torch.nn.Module, folder, extra: dict | None = None) -> None:
    """A `.bin` folder (transformers 5 only writes safetensors), optionally with extra buffers."""
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.update(extra or {})
    torch.save(state, folder / "pytorch_model.bin")


@dataclasses.dataclass
class Towers:
    clip_dir: object
    llama_dir: object
    clip: torch.nn.Module
    llama: torch.nn.Module


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> Towers:
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    clip = _perturb(
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION, attn_implementation="eager")), 1
    )
    clip.save_pretrained(root / "clip")
    llama = _perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, attn_implementation="eager")), 2)
    # Older checkpoints carry RoPE buffers; they must be skipped, not reported.
    _save_bin(llama, root / "llama", {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    return Towers(root / "clip", root / "llama", clip, llama)


@pytest.fixture(scope="module")
def imported(towers):
    cfg, leaves = init_from_towers(str(towers.clip_dir), str(towers.llama_dir), show_progress=False)
    graphdef, abstract = abstract_model(cfg)
    return cfg, leaves, assemble(graphdef, abstract, leaves)


def _pixels() -> np.ndarray:
    return np.random.RandomState(0).randn(2, 3, 28, 28).astype(np.float32)


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


def _max_err(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().numpy().astype(np.float64))))


def test_vision_tower_matches_clip(towers, imported):
    _, _, model = imported
    pixels = _pixels()
    with torch.no_grad():
        ref = towers.clip(pixel_values=torch.from_numpy(pixels))
    tower = model.vision_model
    post = tower.post_layernorm
    tower.post_layernorm = _Identity()  # the encoder output before the post-LN = CLIP's last_hidden_state
    try:
        hidden = tower(jnp.asarray(pixels))
    finally:
        tower.post_layernorm = post
    err_hidden = _max_err(hidden, ref.last_hidden_state)
    err_pooled = _max_err(model.vision_features(pixels)[:, 0], ref.pooler_output)
    print(f"ViT max abs error: hidden {err_hidden:.2e}, pooled {err_pooled:.2e}")
    assert err_hidden <= TOL
    assert err_pooled <= TOL


def test_language_model_matches_llama(towers, imported):
    _, _, model = imported
    ids = np.random.RandomState(1).randint(0, LLAMA["vocab_size"], (2, 9))
    with torch.no_grad():
        ref = towers.llama(torch.from_numpy(ids)).logits
    err = _max_err(model(None, ids), ref)
    print(f"LLaMA logits max abs error: {err:.2e}")
    assert err <= TOL


def test_leaves_cover_the_model(imported):
    cfg, leaves, _ = imported
    shapes = leaf_shapes(abstract_model(cfg)[1])
    assert set(leaves) == set(shapes)
    assert all(tuple(leaves[p].shape) == s for p, (s, _) in shapes.items())
    assert cfg.vision.layer_norm_eps == 1e-5  # CLIP's, not mPLUG-Owl's default


def test_full_clip_model_imports(towers, tmp_path):
    torch.manual_seed(3)
    text = dict(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=10,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    full = _perturb(
        transformers.CLIPModel(
            transformers.CLIPConfig(
                text_config=text, vision_config=VISION, projection_dim=8, attn_implementation="eager"
            )
        ),
        4,
    )
    full.save_pretrained(tmp_path)
    # Older CLIP checkpoints also hold `position_ids` buffers: ignored like the text tower.
    weights = load_file(tmp_path / "model.safetensors")
    weights["vision_model.embeddings.position_ids"] = np.arange(5, dtype=np.int64)[None]
    weights["text_model.embeddings.position_ids"] = np.arange(10, dtype=np.int64)[None]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    cfg, leaves = init_from_towers(str(tmp_path), str(towers.llama_dir), show_progress=False)
    model = assemble(*abstract_model(cfg), leaves)
    pixels = _pixels()
    with torch.no_grad():
        ref = full.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output
    assert _max_err(model.vision_features(pixels)[:, 0], ref) <= TOL


def _rewrite_clip(src, dst, change) -> None:
    shutil.copytree(src, dst)
    weights = load_file(src / "model.safetensors")
    change(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})


def _rewrite_llama(src, dst, change) -> None:
    shutil.copytree(src, dst)
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    change(state)
    torch.save(state, dst / "pytorch_model.bin")


@pytest.mark.parametrize(
    "tower, key, change",
    [
        ("clip", "encoder.layers.1.self_attn.k_proj.bias", lambda w: w.pop("encoder.layers.1.self_attn.k_proj.bias")),
        (
            "clip",
            "encoder.layers.2.mlp.fc1.bias",
            lambda w: w.update({"encoder.layers.2.mlp.fc1.bias": np.ones(64, np.float32)}),
        ),
        (
            "clip",
            "embeddings.position_embedding.weight",
            lambda w: w.update({"embeddings.position_embedding.weight": np.ones((6, 32), np.float32)}),
        ),
        ("llama", "lm_head.weight", lambda s: s.pop("lm_head.weight")),
        (
            "llama",
            "model.layers.0.self_attn.k_proj.weight",
            lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.ones(32, 32)}),
        ),
        (
            "llama",
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            lambda s: s.update({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32)}),
        ),
    ],
)
def test_mismatched_tower_checkpoint_is_refused(towers, tmp_path, tower, key, change):
    clip_dir, llama_dir = towers.clip_dir, towers.llama_dir
    if tower == "clip":
        clip_dir = tmp_path / "clip"
        _rewrite_clip(towers.clip_dir, clip_dir, change)
    else:
        llama_dir = tmp_path / "llama"
        _rewrite_llama(towers.llama_dir, llama_dir, change)
    with pytest.raises(CheckpointMismatchError, match=re.escape(key)):
        init_from_towers(str(clip_dir), str(llama_dir), show_progress=False)


def test_abstractor_is_random_and_seeded(towers, imported):
    _, leaves, _ = imported
    _, again = init_from_towers(str(towers.clip_dir), str(towers.llama_dir), seed=0, show_progress=False)
    _, other = init_from_towers(str(towers.clip_dir), str(towers.llama_dir), seed=1, show_progress=False)
    paths = [p for p in leaves if p[0] == "abstractor"]
    assert {p[1] for p in paths} == {"query_tokens", "layers", "visual_fc", "vit_eos"}
    for p in paths:
        assert leaves[p].dtype == np.float32
        np.testing.assert_array_equal(leaves[p], again[p])
    drawn = [p for p in paths if p[-1] in ("kernel", "query_tokens", "vit_eos")]
    assert len(drawn) == 10  # query, key, value, out_proj, w1, w2, w3 and visual_fc kernels, queries, vit_eos
    for p in drawn:
        assert np.std(leaves[p]) > 1e-3, p
        assert not np.array_equal(leaves[p], other[p]), p
    # The towers themselves do not depend on the seed.
    np.testing.assert_array_equal(leaves[("language_model", "embed_tokens")], other[("language_model", "embed_tokens")])


def test_dtype_casts_every_leaf(towers):
    _, leaves = init_from_towers(str(towers.clip_dir), str(towers.llama_dir), dtype="bfloat16", show_progress=False)
    assert {a.dtype for a in leaves.values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_config_for_clip_large_and_llama_7b():
    clip = {
        "model_type": "clip",
        "vision_config": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "projection_dim": 768,
        },
    }
    llama = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32}
    cfg = config_from_towers(clip, llama, dtype="bfloat16")
    assert cfg.abstractor == AbstractorConfig()
    assert (cfg.vision.image_size, cfg.vision.layer_norm_eps, cfg.vision.hidden_act) == (224, 1e-5, "quick_gelu")
    assert cfg.dtype == "bfloat16" and cfg.text.hidden_size == 4096
    flat = {"model_type": "clip_vision_model", "hidden_size": 768, "num_attention_heads": 12}
    small = config_from_towers(flat, llama).abstractor
    assert (small.hidden_size, small.num_heads, small.intermediate_size) == (768, 12, 2112)
    json.dumps(dataclasses.asdict(small))  # plain data: can go into a run's config file


def test_cli_init_writes_a_loadable_model(towers, tmp_path):
    import subprocess
    import sys

    import owl_jax

    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [
            sys.executable,
            str(repo / "convert_weights.py"),
            "init",
            str(tmp_path / "fresh"),
            "--clip",
            str(towers.clip_dir),
            "--llama",
            str(towers.llama_dir),
            "--num-query-tokens",
            "4",
            "--seed",
            "3",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "tensors" in result.stderr  # the progress bar counts tensors (and bytes)
    model, _ = owl_jax.from_pretrained(tmp_path / "fresh", show_progress=False)
    assert model.config.image_tokens == 5
    ids = np.array([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = towers.llama(torch.from_numpy(ids)).logits
    assert _max_err(model(None, ids), expected) < TOL
