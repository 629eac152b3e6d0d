"""The server's `best_of` / `num_beams` (beam search) and `stop` options: how a request maps onto the decoding
options, the refusals, the worker handing them to the generator, and a streamed answer cut before a stop
string (none of it ever sent)."""

import numpy as np
import pytest

from helpers import FIXTURE
from owl_jax.data.processor import OwlProcessor
from owl_jax.inference.generate import GenerationOutput
from owl_jax.serve.errors import ApiError
from owl_jax.serve.options import parse_options
from owl_jax.serve.worker import Job, ModelWorker, TextStream


def options(**body):
    config, *_ = parse_options(body, max_new_tokens=16, eos_token_id=2, pad_token_id=0, bos_token_id=1)
    return config


def refused(**body) -> ApiError:
    with pytest.raises(ApiError) as caught:
        options(**body)
    assert caught.value.status == 400
    return caught.value


def test_best_of_and_num_beams_ask_for_beam_search():
    assert options().num_beams == 1 and options().do_sample  # the OpenAI default: temperature 1
    for body in ({"best_of": 3}, {"num_beams": 3}, {"best_of": 3, "num_beams": 3, "temperature": 0}):
        config = options(**body)
        assert config.num_beams == 3 and not config.do_sample and config.validate()
    assert options(best_of=1, temperature=0.5).do_sample  # one beam: sampling as before
    assert refused(best_of=3, temperature=0.5).param == "temperature"
    assert refused(best_of=2, num_beams=3).param == "num_beams"
    for value in (0, 9, 2.5, "3", True):
        assert refused(best_of=value).param == "best_of"
    for value in (0, 9, 2.5, True):  # 1 to 8 choices
        assert refused(n=value).param == "n"


def test_stop_strings_are_a_string_or_a_short_list():
    assert options(stop="\n").stop == ("\n",) and options(stop=["###", "Human:"]).stop == ("###", "Human:")
    assert options(stop=None).stop == options(stop=[]).stop == options(stop="").stop == ()
    for value in ([""], ["a"] * 5, 5, ["a", 3], {"a": 1}, ["x" * 257]):
        assert refused(stop=value).param == "stop"


def test_a_streamed_answer_stops_before_the_stop_string(reference):
    decode = OwlProcessor(FIXTURE / "tokenizer.model", image_tokens=9).decode
    tokens = reference["greedy_0"][1:].tolist()
    text = decode(tokens)  # "8 picturesow]afeenJto8 ..."
    stream = TextStream(decode, eos_token_id=2, stop=("eenJ",))
    pieces = [stream.push(t) for t in tokens[:6]]  # up to "...afeen": "een" may become "eenJ"
    assert "".join(pieces) == text[: text.index("een")]
    pieces += [stream.push(t) for t in tokens[6:]] + [stream.finish()]
    assert "".join(pieces) == text[: text.index("eenJ")]
    assert TextStream(decode, eos_token_id=2).finish() == ""  # no stop strings: as before


class RecordingGenerator:
    """`Generator.generate`'s interface: records its keyword arguments, reports progress once if asked to,
    streams one token."""

    def __init__(self):
        self.calls, self.before_progress = [], lambda: None

    def generate(self, input_ids, attention_mask, pixel_values, config, video_pixel_values=None, **kwargs):
        self.calls.append(kwargs)
        if "on_progress" in kwargs:
            self.before_progress()
            kwargs["on_progress"](1)
        kwargs["stream"](0, np.array([300]), np.array([False]))
        return GenerationOutput([[300]], [True], [int(input_ids.shape[1])])


def events_of(job):
    out = []
    while not out or out[-1][0] not in ("done", "error"):
        out.append(job.events.get(timeout=30))
    return out


def test_worker_hands_stop_strings_and_beams_to_the_generator():
    generator = RecordingGenerator()
    worker = ModelWorker(generator, decode=lambda ids: "x" * len(ids))
    worker.start()
    try:
        ids, px = np.array([[1, 5, 6]], np.int32), np.zeros((0, 3, 224, 224), np.float32)
        for config in (options(), options(stop="###"), options(best_of=2)):
            job = Job(ids, px, config)
            worker.submit(job)
            events = events_of(job)
            assert [kind for kind, _ in events] == ["delta", "done"] and events[-1][1].finish_reason == "stop"
        assert [sorted(k for k in call if k != "stream") for call in generator.calls] == [
            [],
            ["decode"],
            ["on_progress"],
        ]
        assert generator.calls[1]["decode"]([1, 2]) == "xx"
        # A client that goes away during a beam search: the search's progress report ends it.
        job = Job(ids, px, options(best_of=2))
        generator.before_progress = job.cancelled.set
        worker.submit(job)
        (kind, error), *_ = events_of(job)
        assert kind == "error" and error.status == 503 and "cancelled" in str(error)
    finally:
        worker.stop()
