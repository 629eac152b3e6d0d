"""Sampling numbers are values of the compiled steps, not part of them: a server compiles its decode steps
once however many temperatures, top-p, top-k or min_new_tokens values its clients send, and the masks stay
those of the released model's `generate` (HF transformers 4.28)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import load_fixture_model
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.sampling import NEG_INF, process_logits

pytestmark = pytest.mark.compile_quickly

# One structure (sampling with top-k, top-p and min_new_tokens), many values.
SETTINGS = [
    dict(temperature=0.71, top_p=0.9, top_k=40, min_new_tokens=2),
    dict(temperature=0.72, top_p=0.85, top_k=7, min_new_tokens=3),
    dict(temperature=1.3, top_p=0.5, top_k=3, min_new_tokens=1),
    dict(temperature=0.4, top_p=0.99, top_k=100000, min_new_tokens=6),
]


def test_new_sampling_values_compile_nothing(reference):
    gen = Generator(load_fixture_model("checkpoint"))
    ids, px = reference["input_ids"][:1, :61], reference["pixel_values"][:1]
    sizes = lambda: (gen.prefill._cache_size(), gen.first_select._cache_size(), gen.decode_chunk_fn._cache_size())

    def run(**options):
        config = GenerationConfig(max_new_tokens=6, do_sample=True, seed=1, **options)
        return gen.generate(ids, None, px, config).tokens[0]

    first = run(**SETTINGS[0])
    compiled = sizes()
    results = [first] + [run(**s) for s in SETTINGS[1:]]
    assert sizes() == compiled  # new values, no new program
    assert [run(**s) for s in SETTINGS] == results  # and each setting's tokens are reproducible
    assert len({tuple(r) for r in results}) > 1  # the values reach the steps
    assert sizes() == compiled
    # The seed, the length and greedy decoding's ignored sampling options compile nothing either.
    greedy = GenerationConfig(max_new_tokens=12, min_new_tokens=12)
    assert gen.generate(ids, None, px, greedy).tokens[0] == reference["greedy_0"][1:].tolist()
    after_greedy = np.array(sizes())
    ignored = GenerationConfig(max_new_tokens=5, min_new_tokens=5, temperature=0.3, top_k=4, top_p=0.2, seed=9)
    assert gen.generate(ids, None, px, ignored).tokens[0] == reference["greedy_0"][1:6].tolist()
    assert (np.array(sizes()) == after_greedy).all()


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def warped_with_constants(logits, temperature: float, top_k: int, top_p: float):
    """The warpers as they were compiled per setting: constants, `lax.top_k` with a static k."""
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, NEG_INF, logits)
    return logits


def test_traced_masks_equal_the_per_setting_ones():
    """Ties (kept at the k-th largest, ranked in vocabulary order for top-p), a banned token, a k past the
    vocabulary: the same logits bit for bit (so the same samples), from one program per structure."""
    rng = np.random.default_rng(0)
    logits = np.round(rng.normal(size=(3, 64)) * 2) / 2  # many ties
    logits[1, :5] = logits[1, 5]
    logits = jnp.asarray(logits, jnp.float32)
    history, length = jnp.array([[1, 7, 9, 7, 0, 0]] * 3), jnp.full((3,), 4)  # bans 9 after the last 7
    banned = jnp.where(jnp.arange(64) == 9, NEG_INF, logits)
    process = jax.jit(process_logits, static_argnums=(4,))
    settings = [(5, 1.0, 0.7), (200, 1.0, 1.9), (0, 0.6, 0.7), (0, 0.97, 1.3), (4, 0.5, 1.0), (64, 0.3, 1.9)]
    for top_k, top_p, temperature in settings:
        config = GenerationConfig(
            do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, no_repeat_ngram_size=2
        )
        structure, values = config.structure(), config.values()
        expected = warped_with_constants(banned, temperature, top_k, top_p)
        got = process(logits, jnp.int32(3), history, length, structure, values)
        np.testing.assert_array_equal(got, expected, err_msg=f"{config}")
        assert int((got > NEG_INF).sum(axis=-1).min()) > 0  # something is left to sample
    assert process._cache_size() == 3  # top-k alone, top-p alone, both: three programs for six settings
