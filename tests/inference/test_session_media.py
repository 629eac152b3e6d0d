"""`ChatSession` with videos (the video fixture) and with the BLOOMZ model: every turn's answer equals a fresh
`Generator.generate` of the processor's inputs for the whole conversation, each medium is encoded once, and
later turns prefill only what the cache does not hold."""

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import BLOOMZ, VIDEO_FIXTURE, load_bloomz_model, load_fixture_model
from owl_jax.data.processor import OwlProcessor
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.session import ChatSession

pytestmark = pytest.mark.compile_quickly  # the session and the fresh generations are compiled alike

VIDEO_A, VIDEO_B = VIDEO_FIXTURE / "videos" / "a.mp4", VIDEO_FIXTURE / "videos" / "b.mp4"
IMAGE_A, IMAGE_B = VIDEO_FIXTURE / "images" / "a.png", VIDEO_FIXTURE / "images" / "b.png"


def greedy(processor) -> GenerationConfig:
    ids = dict(eos_token_id=processor.eos_token_id, bos_token_id=processor.bos_token_id)
    return GenerationConfig(max_new_tokens=8, min_new_tokens=8, pad_token_id=processor.pad_token_id, **ids)


class Spy:
    """Wraps the generator's `extend` and `encode_*` to record, during `ask`, where each turn's prefill starts
    and how many media each encode call gets."""

    def __init__(self, gen, monkeypatch):
        self.starts, self.encoded, self.recording = [], [], False
        extend, encode_images, encode_videos = gen.extend, gen.encode_images, gen.encode_videos

        def spy_extend(*args):
            self.starts.append(int(args[6]))
            return extend(*args)

        def spy_encode(encode, kind):
            def run(pixels):
                if self.recording:
                    self.encoded.append((kind, len(pixels)))
                return encode(pixels)

            return run

        monkeypatch.setattr(gen, "extend", spy_extend)
        monkeypatch.setattr(gen, "encode_images", spy_encode(encode_images, "image"))
        monkeypatch.setattr(gen, "encode_videos", spy_encode(encode_videos, "video"))

    def ask(self, session, *args, **kwargs) -> str:
        self.recording = True
        try:
            return session.ask(*args, **kwargs)
        finally:
            self.recording = False


def asked_prompt(session) -> str:
    """The prompt the session's last turn was asked with (the conversation up to its "AI: ")."""
    last = session.turns[-1]
    answer, last.answer = last.answer, None
    try:
        return session.prompt
    finally:
        last.answer = answer


def fresh_answer(gen, processor, prompt, images=(), videos=()) -> tuple[str, int]:
    """The answer `Generator.generate` gives for `prompt` from the processor's inputs, and the prompt's length."""
    inputs = processor([prompt], images=list(images), videos=list(videos))
    out = gen.generate(
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        greedy(processor),
        inputs.get("video_pixel_values"),
    )
    text = processor.decode([t for t in out.tokens[0] if t != processor.eos_token_id]).strip()
    return text, int(inputs["attention_mask"].sum())


@pytest.fixture(scope="module")
def video_owl():
    model = load_fixture_model(str(VIDEO_FIXTURE / "checkpoint"))
    return Generator(model, prompt_bucket=256), OwlProcessor.from_pretrained(VIDEO_FIXTURE, config=model.config)


def test_video_turns_equal_generate_and_reuse_the_cache(video_owl, monkeypatch):
    gen, processor = video_owl
    spy = Spy(gen, monkeypatch)
    session = ChatSession(gen, processor, max_length=512, config=greedy(processor))
    first = spy.ask(session, "What is moving in this video?", videos=[VIDEO_A])
    assert asked_prompt(session).endswith("Human: <|video|>\nHuman: What is moving in this video?\nAI: ")
    want, first_len = fresh_answer(gen, processor, asked_prompt(session), videos=[VIDEO_A])
    assert first == want

    # A video, then an image: the markers keep the order of `media`.
    second = spy.ask(session, "And these two?", media=[("video", VIDEO_B), ("image", IMAGE_A)])
    prompt = asked_prompt(session)
    assert prompt.endswith("Human: <|video|>\nHuman: <image>\nHuman: And these two?\nAI: ")
    assert second == fresh_answer(gen, processor, prompt, images=[IMAGE_A], videos=[VIDEO_A, VIDEO_B])[0]

    third = spy.ask(session, "Which one is brighter?")
    prompt = asked_prompt(session)
    assert third == fresh_answer(gen, processor, prompt, images=[IMAGE_A], videos=[VIDEO_A, VIDEO_B])[0]
    assert len({first, second, third}) == 3  # the turns really saw different prompts
    # Each medium was encoded once, when it was added; the later turns prefilled after the cached prefix
    # (which holds the first video's run, so the second turn took the second video for its -2 run).
    assert spy.encoded == [("video", 1), ("image", 1), ("video", 1)]
    assert spy.starts[0] == 0 and first_len - 1 <= spy.starts[1] < spy.starts[2]
    assert len(session.video_embeds) == 2 and len(session.image_embeds) == 1


def test_media_run_order_and_prefix_are_kept_apart_by_kind():
    """Runs of -1 and -2 after the cached prefix take the next image and the next video in prompt order."""
    session = object.__new__(ChatSession)
    session.reset()
    session.embeds = {"<image>": [jnp.full((2, 1), 10.0), jnp.full((2, 1), 11.0)], "<|video|>": []}
    session.embeds["<|video|>"] = [jnp.full((2, 1), 20.0), jnp.full((2, 1), 21.0)]
    ids = [1, 5, -2, -2, 6, -1, -1, 7, 8, -1, -1, 9, -2, -2, 4]
    session.cached_ids = ids[:9] + [3, 3]  # the first video and image are cached; the rest differs
    start = session._reusable_prefix(ids)
    assert start == 9
    suffix, embeds = session._new_media(ids, start)
    assert suffix == [-1, -1, 9, -1, -1, 4]  # the video run goes over as a run of the one media stream
    assert np.asarray(embeds)[:, 0, 0].tolist() == [11.0, 21.0]
    session.cached_ids = ids[:3]  # a cache ending inside a run is reused only up to the run's start
    assert session._reusable_prefix(ids) == 2
    with pytest.raises(ValueError, match="touch"):
        session._new_media([1, -1, -1, -2, -2, 4], 0)


@pytest.fixture(scope="module")
def bloomz_owl():
    model = load_bloomz_model("checkpoint")
    return Generator(model, prompt_bucket=256), OwlProcessor.from_pretrained(BLOOMZ, config=model.config)


def test_bloomz_turns_equal_generate(bloomz_owl, monkeypatch):
    gen, processor = bloomz_owl
    spy = Spy(gen, monkeypatch)
    session = ChatSession(gen, processor, max_length=512, config=greedy(processor))
    image_a, image_b = BLOOMZ / "images" / "a.png", BLOOMZ / "images" / "b.png"
    first = spy.ask(session, "这张图片的左上角画的是什么？", [image_a])
    prompt = asked_prompt(session)
    assert processor.encode_prompt(prompt)[0] == processor.bos_token_id == 1  # BLOOM prompts start with <s>
    assert first == fresh_answer(gen, processor, prompt, images=[image_a])[0]
    second = spy.ask(session, "Combien de cercles voyez-vous ?", [image_b])
    assert second == fresh_answer(gen, processor, asked_prompt(session), images=[image_a, image_b])[0]
    assert first != second and spy.starts[1] > 0


def test_videos_are_refused_by_an_image_layout_model(bloomz_owl):
    gen, processor = bloomz_owl
    session = ChatSession(gen, processor, max_length=512, config=greedy(processor))
    with pytest.raises(ValueError, match="1 videos were given, but this model is the image layout"):
        session.ask("What is moving?", videos=[VIDEO_A])
    with pytest.raises(ValueError, match=r"media\[0\] must be an \('image', item\) or \('video', item\) pair"):
        session.ask("What is moving?", media=[("audio", VIDEO_A)])
    with pytest.raises(ValueError, match="<image>"):
        session.ask("What is in <image>?", [BLOOMZ / "images" / "a.png"])
    assert session.turns == [] and session.pending == [] and session.image_embeds == []
