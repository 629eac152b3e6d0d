"""Greedy decoding reproduces the released model's `generate` token for token (the fixture's greedy_0/1).

These programs compile as users run them; the rest of the generation tests compile quickly.
"""

import jax
import pytest

from helpers import load_fixture_model
from owl_jax.inference.generate import GenerationConfig, Generator

GREEDY = GenerationConfig(max_new_tokens=12, min_new_tokens=12)  # the fixture's generate() call


@pytest.fixture(scope="module")
def generator():
    return Generator(load_fixture_model("checkpoint"))


def test_greedy_matches_released_generate_alone_and_batched(generator, reference):
    ids, mask, px = reference["input_ids"], reference["attention_mask"], reference["pixel_values"]
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    alone0 = generator.generate(ids[:1, :n0], None, px[:1], GREEDY).tokens[0]
    alone1 = generator.generate(ids[1:2, :n1], None, px[1:3], GREEDY).tokens[0]
    both = generator.generate(ids[:2], mask[:2], px[:3], GREEDY).tokens
    assert alone0 == reference["greedy_0"][1:].tolist()  # the fixture's first id is the BOS HF prepends
    assert alone1 == reference["greedy_1"][1:].tolist()
    assert both == [alone0, alone1]


@pytest.mark.parametrize("fuse", [True, False])
def test_unstacked_layers_reproduce_the_released_greedy(reference, fuse):
    gen = Generator(load_fixture_model("checkpoint"), unstack_layers=True, fuse_projections=fuse)
    assert (gen.state[2] is not None) == fuse  # the q/k/v and gate/up kernels concatenated per layer
    out = gen.generate(
        reference["input_ids"][:2], reference["attention_mask"][:2], reference["pixel_values"][:3], GREEDY
    )
    assert out.tokens == [reference["greedy_0"][1:].tolist(), reference["greedy_1"][1:].tolist()]
    # The generator holds no stacked LLM layer weights of its own, and its KV cache is one buffer per layer.
    sizes = [a.size for a in jax.tree.leaves(gen.state[0]["language_model"]["layers"])]
    assert sizes and all(n == 1 for n in sizes)
    text = gen.model.config.text
    cache = gen.new_cache(2, 16)
    assert cache.per_layer and len(cache.k) == len(cache.v) == text.num_layers
    assert cache.k[0].shape == (2, text.num_kv_heads, 16, text.head_dim)
