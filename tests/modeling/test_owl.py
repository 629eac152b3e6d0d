"""Model building blocks: image splicing, placeholder checks, the KV-cache path, scanned layers, LoRA targets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import load_fixture_model, subjaxprs
from owl_jax.config import LoRAConfig, OwlConfig
from owl_jax.modeling import Owl, causal_padding_mask, check_image_placeholders, merge_image_embeddings


def test_merge_image_embeddings_follows_run_order():
    ids = jnp.array([[5, -1, -1, 7, -1, -1], [-1, -1, 9, 9, 3, 4]])
    text = jnp.zeros((2, 6, 1))
    images = jnp.arange(1, 7, dtype=jnp.float32).reshape(3, 2, 1)  # image r has values 2r+1, 2r+2
    out = merge_image_embeddings(text, ids, images)[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0, 3, 4], [5, 6, 0, 0, 0, 0]])


def test_merge_is_jittable_and_keeps_text():
    ids = jnp.array([[1, 2, -1, -1, -1, 3]])
    text = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1)
    images = jnp.full((1, 3, 1), 100.0)
    out = jax.jit(merge_image_embeddings)(text, ids, images)[0, :, 0]
    np.testing.assert_array_equal(out, [0, 1, 100, 100, 100, 5])


def test_placeholder_checks():
    ok = np.array([[1, -1, -1, -1, 5], [1, 4, -1, -1, -1]])
    check_image_placeholders(ok, num_images=2, tokens_per_image=3)
    with pytest.raises(ValueError, match="2 image placeholder runs but pixel_values has 1"):
        check_image_placeholders(ok, num_images=1, tokens_per_image=3)
    adjacent = np.array([[1, -1, -1, -1, -1, -1, -1, 2]])
    with pytest.raises(ValueError, match="run of 6 image placeholders at position 1"):
        check_image_placeholders(adjacent, num_images=2, tokens_per_image=3)


def test_model_call_rejects_mismatched_images(reference):
    model = load_fixture_model("checkpoint")
    with pytest.raises(ValueError, match="3 image placeholder runs but pixel_values has 2"):
        model(reference["pixel_values"][:2], reference["input_ids"], reference["attention_mask"])
    with pytest.raises(ValueError, match="expects"):
        model.vision_features(np.zeros((1, 3, 112, 112), np.float32))


def test_kv_cache_prefill_and_decode_equal_full_forward(reference):
    model = load_fixture_model("checkpoint")
    lm = model.language_model
    length, prefill, cache_len = 48, 40, 64
    ids = jnp.asarray(reference["input_ids"][2:3, :length])  # text-only row, no padding
    embeds = lm.embed(ids)
    positions = jnp.arange(length)[None]
    full, _ = lm(embeds, positions, causal_padding_mask(jnp.ones((1, length), jnp.int32)))
    cache = model.init_cache(1, cache_len)
    slots = jnp.arange(cache_len)
    mask = (slots[None, :] <= jnp.arange(prefill)[:, None])[None]
    hidden, cache = lm(embeds[:, :prefill], positions[:, :prefill], mask, cache=cache, cache_index=0)
    np.testing.assert_allclose(hidden, full[:, :prefill], atol=1e-5, rtol=0)
    step = jax.jit(lambda e, p, m, c, i: lm(e, p, m, cache=c, cache_index=i))
    for t in range(prefill, length):
        hidden, cache = step(embeds[:, t : t + 1], positions[:, t : t + 1], (slots <= t)[None, None], cache, t)
        np.testing.assert_allclose(hidden[:, 0], full[:, t], atol=1e-5, rtol=0)


def _count_dots(cfg: OwlConfig) -> int:
    model = Owl(cfg, rngs=nnx.Rngs(0))
    ids = jnp.ones((1, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda m, i: m.forward(None, i))(model, ids)

    def count(j) -> int:
        n = 0
        for eqn in j.eqns:
            n += eqn.primitive.name == "dot_general"
            for sub in subjaxprs(eqn):
                n += count(sub)
        return n

    return count(jaxpr.jaxpr)


def _tiny(layers: int, scan: bool) -> OwlConfig:
    cfg = OwlConfig.from_hf_config(__import__("conftest").FIXTURE / "checkpoint")
    return cfg.replace(text=dataclasses.replace(cfg.text, num_layers=layers), scan_layers=scan)


def test_scanned_layers_trace_one_layer():
    assert _count_dots(_tiny(2, True)) == _count_dots(_tiny(6, True))
    assert _count_dots(_tiny(6, False)) > _count_dots(_tiny(2, False))


def test_lora_must_cover_every_stacked_layer():
    cfg = _tiny(2, True).replace(lora=LoRAConfig(rank=2, alpha=4, target_modules=r".*layers\.0\.self_attn\.q_proj"))
    with pytest.raises(ValueError, match="select only some layers"):
        Owl(cfg, rngs=nnx.Rngs(0))


def test_lora_targets_by_suffix_list_and_starts_as_identity(reference):
    base = load_fixture_model("checkpoint")
    cfg = base.config.replace(lora=LoRAConfig(rank=2, alpha=4, dropout=0.0, target_modules=("q_proj", "fc1")))
    model = Owl(cfg, rngs=nnx.Rngs(0))
    assert model.language_model.layers.q_proj.lora_a is not None
    assert model.vision_model.layers.fc1.lora_a is not None
    assert model.language_model.layers.k_proj.lora_a is None
    assert model.language_model.layers.q_proj.lora_a.shape == (2, 96, 2)
    # B starts at zero: with the base weights copied in, the adapted model equals the base model
    nnx.update(model, nnx.state(base, nnx.Param))
    args = (reference["pixel_values"][:1], reference["input_ids"][:1], reference["attention_mask"][:1])
    np.testing.assert_allclose(model(*args), base(*args), atol=1e-6, rtol=0)


def test_dropout_only_with_a_key(reference):
    model = load_fixture_model("checkpoint")
    px = jnp.asarray(reference["pixel_values"][:1])
    a = model.abstractor(model.vision_model(px))
    b = model.abstractor(model.vision_model(px), jax.random.key(0))
    c = model.abstractor(model.vision_model(px), jax.random.key(0))
    assert float(jnp.abs(a - b).max()) > 1e-3  # attention dropout 0.1 is active with a key
    np.testing.assert_array_equal(b, c)


def test_merge_with_fixed_image_slots_per_row():
    ids = jnp.array([[5, -1, -1, 7, 8], [3, 4, 6, 7, 8], [-1, -1, 9, -1, -1]])
    text = jnp.zeros((3, 5, 1))
    images = jnp.arange(1, 13, dtype=jnp.float32).reshape(6, 2, 1)  # 2 slots per row; slot s holds 2s+1, 2s+2
    out = merge_image_embeddings(text, ids, images, images_per_row=2)[..., 0]
    # row 0 uses its slot 0 (image 0), row 1 none, row 2 its two slots (images 4 and 5)
    np.testing.assert_array_equal(out, [[0, 1, 2, 0, 0], [0, 0, 0, 0, 0], [9, 10, 0, 11, 12]])
