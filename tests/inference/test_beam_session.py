"""Beam search reached from a chat turn (which then goes on from its cache), `owl-chat --num-beams` and
`owl-eval answer --num-beams`."""

import pytest
from PIL import Image

from helpers import FIXTURE, make_owleval
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.inference.session import ChatSession

pytestmark = pytest.mark.compile_quickly


def test_chat_turns_with_beams_equal_generating_from_the_reencoded_conversation(model_and_processor):
    model, processor = model_and_processor
    gen = Generator(model)
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=8, num_beams=3)
    session = ChatSession(gen, processor, max_length=256, config=config)
    a, b = Image.open(FIXTURE / "images" / "a.png"), Image.open(FIXTURE / "images" / "b.png")
    answers, pieces = [], []
    for question, images in (("What is drawn here?", [a]), ("And in this one?", [b])):
        answers.append(session.ask(question, [*images], stream=pieces.append))
        prompt = session.prompt[: session.prompt.rindex("AI: ") + len("AI: ")]
        inputs = processor([prompt], images=[a, b][: len(answers)])
        fresh = gen.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], config)
        assert answers[-1] == processor.decode([t for t in fresh.tokens[0] if t != config.eos_token_id]).strip()
        assert session.cached_ids == inputs["input_ids"][0][: len(session.cached_ids)].tolist()
    greedy = ChatSession(gen, processor, max_length=256, config=GenerationConfig(max_new_tokens=8, min_new_tokens=8))
    assert greedy.ask("What is drawn here?", [a]) != answers[0]  # the beams chose another answer
    assert "".join(pieces).replace(" ", "") == "".join(answers).replace(" ", "")  # each answer streamed once


class _Session:
    """Stands in for `ChatSession`: keeps the options it was made with and answers "ok"."""

    options: dict = {}

    def __init__(self, generator, processor, **options):
        _Session.options = options

    def ask(self, question, images=(), *, media=(), stream=None):
        stream("ok")
        return "ok"


def _fake_load(monkeypatch):
    """`owl_jax.from_pretrained` gives the fixture's processor and no model; nothing is compiled."""
    import owl_jax.inference.generate
    import owl_jax.inference.session
    from owl_jax.data.processor import OwlProcessor

    processor = OwlProcessor(FIXTURE / "tokenizer.model", image_tokens=9)
    monkeypatch.setattr(owl_jax, "from_pretrained", lambda path, **kw: (object(), processor))
    monkeypatch.setattr(owl_jax.inference.generate, "Generator", lambda model, **kw: None)
    monkeypatch.setattr(owl_jax.inference.session, "ChatSession", _Session)


def test_owl_chat_num_beams(monkeypatch, capsys):
    from owl_jax.cli.chat import main

    _fake_load(monkeypatch)
    assert main(["--checkpoint", "unused", "--prompt", "hi", "--num-beams", "3"]) == 0
    config = _Session.options["config"]
    assert config.num_beams == 3 and not config.do_sample
    assert main(["--checkpoint", "unused", "--prompt", "hi", "--num-beams", "2", "--temperature", "0.7"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("owl-chat: error: --num-beams above 1")
    with pytest.raises(SystemExit) as caught:
        main(["--checkpoint", "unused", "--prompt", "hi", "--num-beams", "0"])
    assert caught.value.code == 2 and "argument --num-beams: invalid value" in capsys.readouterr().err


def test_owl_eval_answer_num_beams(monkeypatch, tmp_path, capsys):
    import owl_jax.cli.eval as cli

    _fake_load(monkeypatch)
    seen = []
    monkeypatch.setattr(
        cli, "answer_owleval", lambda model, processor, folder, *, config, **kw: seen.append(config) or []
    )
    folder, out = make_owleval(tmp_path / "owleval"), tmp_path / "answers.jsonl"
    base = ["answer", "--checkpoint", "unused", "--owleval", str(folder), "--out", str(out), "--quiet"]
    assert cli.main([*base, "--num-beams", "4"]) == 0
    assert seen[0].num_beams == 4 and not seen[0].do_sample and out.read_text() == ""
    for bad in (["--num-beams", "0"], ["--num-beams", "2", "--top-k", "5"]):
        assert cli.main([*base, *bad]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --num-beams")
    assert len(seen) == 1  # both refused before the model loads
