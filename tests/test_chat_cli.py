"""`owl-chat`'s refusals: one line and exit status 2 for bad arguments, checkpoints and images; non-UTF-8
input lines refused one by one. (Answers themselves are tested through `ChatSession` and the server.)"""

import io
import sys

import pytest

from helpers import FIXTURE
from owl_jax.cli.chat import main


class FakeSession:
    """Stands in for `ChatSession` (no model): answers "ok", or raises ValueError for questions with "long"."""

    asked: list = []

    def __init__(self, generator, processor, **options):
        pass

    def ask(self, question, images=(), stream=None):
        if "long" in question:
            raise ValueError("the conversation needs 9999 positions but the session has 2048")
        FakeSession.asked.append((question, list(images)))
        stream("ok")
        return "ok"

    def reset(self):
        pass


@pytest.fixture()
def checkpoint(monkeypatch):
    """A checkpoint path whose loading gives the fixture's processor and no model (nothing is compiled)."""
    import owl_jax
    import owl_jax.inference.generate
    import owl_jax.inference.session
    from owl_jax.data.processor import OwlProcessor

    processor = OwlProcessor(FIXTURE / "tokenizer.model", image_tokens=9)
    monkeypatch.setattr(owl_jax, "from_pretrained", lambda path, **kw: (object(), processor))
    monkeypatch.setattr(owl_jax.inference.generate, "Generator", lambda model, **kw: None)
    monkeypatch.setattr(owl_jax.inference.session, "ChatSession", FakeSession)
    FakeSession.asked = []
    return "checkpoint"


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_missing_checkpoint_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nonexistent")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("owl-chat: error: cannot load the checkpoint") and "nonexistent" in line


@pytest.mark.parametrize(
    "option",
    [["--temperature", "-1"], ["--temperature", "nan"], ["--top-p", "0"], ["--top-p", "1.5"]]
    + [["--max-new-tokens", "0"], ["--top-k", "-3"], ["--max-length", "0"]],
)
def test_bad_decoding_options_are_argparse_errors(option, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--checkpoint", "unused", "--prompt", "hi", *option])
    assert caught.value.code == 2
    assert f"argument {option[0]}: invalid value" in capsys.readouterr().err


def test_missing_image_is_refused_before_loading(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main(["--checkpoint", str(tmp_path / "not-even-loaded"), "--image", str(missing), "--prompt", "hi"]) == 2
    assert error_lines(capsys) == [f"owl-chat: error: cannot read image {str(missing)!r}: no such file"]


def test_undecodable_image_and_non_utf8_input(checkpoint, tmp_path, capsys, monkeypatch):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a picture")
    assert main(["--checkpoint", checkpoint, "--image", str(fake), "--prompt", "hi"]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"owl-chat: error: cannot read image {str(fake)!r}")
    # A line that is not UTF-8 is refused and skipped; the session goes on (and ends with status 1, as
    # the input was not a terminal).
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe caf\xe9\n/reset\n/quit\n")))
    assert main(["--checkpoint", checkpoint]) == 1
    lines = error_lines(capsys)
    assert lines[0].startswith("error: input line 1 is not valid UTF-8") and lines[0].endswith("skipped")
    assert lines[1:] == ["(new conversation)"]


def test_one_shot_status_follows_the_answer(checkpoint, capsys):
    image = str(FIXTURE / "images" / "b.png")
    assert main(["--checkpoint", checkpoint, "--image", image, "--prompt", "what?"]) == 0
    assert FakeSession.asked == [("what?", [image])] and capsys.readouterr().out == "ok\n"
    assert main(["--checkpoint", checkpoint, "--prompt", "too long"]) == 1
    assert error_lines(capsys) == ["error: the conversation needs 9999 positions but the session has 2048"]
