"""Beam search reproduces the released model's `generate(num_beams=3)` token for token (the fixture's
beam3_0/1), alone and in one padded batch; one beam is the greedy path; stop strings cut the hypotheses.

These programs compile as users run them, as the released greedy checks do.
"""

import dataclasses

import numpy as np
import pytest

from helpers import FIXTURE, load_fixture_model
from owl_jax.data.processor import OwlProcessor
from owl_jax.inference.generate import GenerationConfig, Generator

BEAMS = GenerationConfig(max_new_tokens=12, min_new_tokens=12, num_beams=3)  # the fixture's generate() call


@pytest.fixture(scope="module")
def generator():
    return Generator(load_fixture_model("checkpoint"))


def test_beams_match_released_generate_alone(generator, reference):
    ids, mask, px = reference["input_ids"], reference["attention_mask"], reference["pixel_values"]
    for row, images in ((0, px[:1]), (1, px[1:3])):
        n = int(mask[row].sum())
        out = generator.generate(ids[row : row + 1, :n], None, images, BEAMS)
        assert out.tokens[0] == reference[f"beam3_{row}"][1:].tolist()  # the fixture's first id is BOS
        hyps = out.hypotheses[0]
        assert len(hyps) == 3 and hyps[0].tokens == out.tokens[0] and not out.finished[0]
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True) and len({tuple(h.tokens) for h in hyps}) == 3


def test_beams_match_released_generate_batched_and_recompile_nothing(generator, reference):
    ids, mask, px = reference["input_ids"], reference["attention_mask"], reference["pixel_values"]
    both = generator.generate(ids[:2], mask[:2], px[:3], BEAMS)  # right-padded, as the processor pads
    assert both.tokens == [reference["beam3_0"][1:].tolist(), reference["beam3_1"][1:].tolist()]
    sizes = [f._cache_size() for f in (generator.beams.begin, generator.beams.chunk, generator.beams.end)]
    # Another length_penalty, max_new_tokens and min_new_tokens: traced values, no new program.
    other = dataclasses.replace(BEAMS, length_penalty=0.5, max_new_tokens=9, min_new_tokens=3)
    again = generator.generate(ids[:2], mask[:2], px[:3], other)
    assert all(3 < len(t) <= 9 for t in again.tokens)
    assert sizes == [f._cache_size() for f in (generator.beams.begin, generator.beams.chunk, generator.beams.end)]


def test_one_beam_is_the_greedy_path(generator, reference):
    n = int(reference["attention_mask"][0].sum())
    ids, px = reference["input_ids"][:1, :n], reference["pixel_values"][:1]
    out = generator.generate(ids, None, px, dataclasses.replace(BEAMS, num_beams=1))
    assert out.tokens[0] == reference["greedy_0"][1:].tolist() and out.hypotheses is None
    assert np.asarray(reference["greedy_0"]).tolist() != np.asarray(reference["beam3_0"]).tolist()


def test_stop_strings_cut_the_hypotheses_after_the_search(generator, reference):
    decode = OwlProcessor(FIXTURE / "tokenizer.model", image_tokens=9).decode
    best = reference["beam3_0"][1:].tolist()
    text = decode(best)  # "8 picturesow]ordsMet..."
    n = next(i for i in range(1, 13) if "Met" in decode(best[:i]))  # the token that completes "Met"
    length = int(reference["attention_mask"][0].sum())
    ids, px = reference["input_ids"][:1, :length], reference["pixel_values"][:1]
    out = generator.generate(ids, None, px, dataclasses.replace(BEAMS, stop=["Met"]), decode=decode)
    assert out.tokens[0] == best[:n] and out.finished[0] and out.texts[0] == text[: text.index("Met")]
    assert all("Met" not in decode(h.tokens[:-1]) for h in out.hypotheses[0])
