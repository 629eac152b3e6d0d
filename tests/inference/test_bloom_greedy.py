"""Greedy decoding with the BLOOM text tower reproduces the released `generate` token for token (greedy_0/1/2):
each prompt alone, and all three in one left-padded batch whose ALiBi key positions run over the cache."""

import pytest

from helpers import bloomz_images_of, bloomz_reference, load_bloomz_model
from owl_jax.inference.generate import GenerationConfig, Generator

GREEDY = GenerationConfig(max_new_tokens=12, min_new_tokens=12)  # the fixture's generate() call


def _released(row: int) -> list[int]:
    tokens = bloomz_reference()[f"greedy_{row}"].tolist()
    assert tokens[0] == 1  # transformers 4.28 starts the output with the BOS, which is not generated
    return tokens[1:]


@pytest.fixture(scope="module")
def generator():
    return Generator(load_bloomz_model("checkpoint"), prompt_bucket=128)  # one prefill program for all prompts


def test_greedy_matches_released_generate_alone_and_batched(generator):
    ref = bloomz_reference()
    ids, mask = ref["input_ids"], ref["attention_mask"]
    for row in range(3):
        n = int(mask[row].sum())
        alone = generator.generate(ids[row : row + 1, :n], None, bloomz_images_of([row]), GREEDY).tokens[0]
        assert alone == _released(row), row
    # rows of different lengths: left-padded in the cache by different amounts
    batched = generator.generate(ids, mask, ref["pixel_values"], GREEDY).tokens
    assert batched == [_released(row) for row in range(3)]


def test_unstacked_layers_decode_the_same():
    ref = bloomz_reference()
    gen = Generator(load_bloomz_model("checkpoint"), unstack_layers=True)
    assert gen.state[2] is None  # BLOOM's projections are fused already: nothing to concatenate
    out = gen.generate(ref["input_ids"][1:], ref["attention_mask"][1:], bloomz_images_of([1, 2]), GREEDY)
    assert out.tokens == [_released(1), _released(2)]
