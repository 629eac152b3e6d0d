"""Stop strings: where a text holds one, what of a growing text may be shown, and generation ending at one
(batched rows, a chat turn and its stream). The expected tokens are the fixture's greedy tokens, decoded."""

import pytest
from PIL import Image

from helpers import FIXTURE
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.session import ChatSession
from owl_jax.inference.stops import StopScanner, cut_at_stop, find_stop, visible_text

pytestmark = pytest.mark.compile_quickly

STOP = "eenJ"  # the text of greedy_0 is "8 picturesow]afeenJto8 ...": "een" ends token 5, "J" is token 6


def test_finding_cutting_and_holding_back_stop_strings():
    stops = ("\nHuman:", "###")
    assert find_stop("a ### b\nHuman: c", stops) == 2 and find_stop("abc", stops) is None
    assert cut_at_stop("The cat.\nHuman: more", stops) == "The cat." and cut_at_stop("no stop", stops) == "no stop"
    assert visible_text("The cat.\nHu", stops) == "The cat."  # "\nHu" may still become "\nHuman:"
    assert visible_text("The cat.\nHi", stops) == "The cat.\nHi"
    assert visible_text("a #", stops) == "a " and visible_text("a ## b", stops) == "a ## b"
    assert visible_text("x\nHuman: y", stops) == "x" and visible_text("anything", ()) == "anything"
    scanner = StopScanner(["cd"], decode=lambda ids: "".join(chr(ord("a") + i) for i in ids))  # 0 → "a", ...
    assert scanner.first_stop([0, 1, 2, 3, 4], 5) == 4  # "abcd": "cd" complete with the fourth id
    assert scanner.first_stop([0, 1, 2, 3, 4], 1) == 5  # only prefixes ending in the last id are looked at
    assert scanner.first_stop([0, 1, 4], 3) is None


def test_generation_ends_at_a_stop_string_in_its_row_only(model_and_processor, reference):
    model, processor = model_and_processor
    greedy = [reference["greedy_0"][1:].tolist(), reference["greedy_1"][1:].tolist()]
    text = processor.decode(greedy[0])
    assert STOP in text and STOP not in processor.decode(greedy[1])
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12, stop=[STOP])
    with pytest.raises(ValueError, match="stop"):
        Generator(model).generate(reference["input_ids"][:1], reference["attention_mask"][:1], None, config)
    gen = Generator(model, decode_chunk=4)  # the stop completes inside the second chunk
    args = reference["input_ids"][:2], reference["attention_mask"][:2], reference["pixel_values"][:3], config
    streamed = []
    out = gen.generate(*args, decode=processor.decode, stream=lambda s, t, f: streamed.append((t.copy(), f.copy())))
    assert out.tokens == [greedy[0][:7], greedy[1]] and out.finished == [True, False]
    assert out.texts == [text[: text.index(STOP)], processor.decode(greedy[1])]
    assert [int(t[0]) for t, _ in streamed] == greedy[0][:7] + [0] * 5  # then padding, as after EOS
    assert [bool(f[0]) for _, f in streamed] == [False] * 6 + [True] * 6


def test_chat_turn_cuts_its_answer_and_stream_before_a_stop_string(model_and_processor):
    model, processor = model_and_processor
    gen = Generator(model)
    image = Image.open(FIXTURE / "images" / "a.png")
    question = "What is drawn here?"
    plain = ChatSession(gen, processor, max_length=256, config=GenerationConfig(max_new_tokens=10, min_new_tokens=10))
    full = plain.ask(question, [image])
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # three characters from the middle of the answer
    config = GenerationConfig(max_new_tokens=10, min_new_tokens=10, stop=stop)
    session = ChatSession(gen, processor, max_length=256, config=config)
    pieces = []
    answer = session.ask(question, [image], stream=pieces.append)
    assert answer == full[: full.index(stop)].strip() and stop not in "".join(pieces)
    assert "".join(pieces).strip() == answer
    assert session.turns[-1].answer == answer
