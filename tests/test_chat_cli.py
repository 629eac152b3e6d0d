"""`owl-chat`'s refusals: one line and exit status 2 for bad arguments, checkpoints, images and videos;
non-UTF-8 input lines refused one by one; videos read before the model loads and handed to the session in
the order they were attached. (Answers themselves are tested through `ChatSession` and the server.)"""

import io
import subprocess
import sys

import numpy as np
import pytest

from helpers import FIXTURE, VIDEO_FIXTURE
from owl_jax.cli.chat import main
from owl_jax.data.video import read_frames

VIDEO_A = str(VIDEO_FIXTURE / "videos" / "a.mp4")


class FakeSession:
    """Stands in for `ChatSession` (no model): answers "ok", or raises ValueError for questions with "long".

    `asked` holds `(question, [image or video items])` per question, `kinds` the media kinds in order."""

    asked: list = []
    kinds: list = []
    options: dict = {}

    def __init__(self, generator, processor, **options):
        FakeSession.options = options

    def ask(self, question, images=(), *, media=(), stream=None):
        if "long" in question:
            raise ValueError("the conversation needs 9999 positions but the session has 2048")
        FakeSession.asked.append((question, [*images, *(item for _, item in media)]))
        FakeSession.kinds.append(["image"] * len(images) + [kind for kind, _ in media])
        stream("ok")
        return "ok"

    def reset(self):
        pass


def _fake_checkpoint(monkeypatch, processor):
    import owl_jax
    import owl_jax.inference.generate
    import owl_jax.inference.session

    monkeypatch.setattr(owl_jax, "from_pretrained", lambda path, **kw: (object(), processor))
    monkeypatch.setattr(owl_jax.inference.generate, "Generator", lambda model, **kw: None)
    monkeypatch.setattr(owl_jax.inference.session, "ChatSession", FakeSession)
    FakeSession.asked, FakeSession.kinds = [], []
    return "checkpoint"


@pytest.fixture()
def checkpoint(monkeypatch):
    """A checkpoint path whose loading gives the fixture's processor and no model (nothing is compiled)."""
    from owl_jax.data.processor import OwlProcessor

    return _fake_checkpoint(monkeypatch, OwlProcessor(FIXTURE / "tokenizer.model", image_tokens=9))


@pytest.fixture()
def video_checkpoint(monkeypatch):
    """The same for the video layout: the video fixture's processor, no model."""
    from owl_jax.data.processor import OwlProcessor

    return _fake_checkpoint(monkeypatch, OwlProcessor(VIDEO_FIXTURE, image_tokens=9, layout="video"))


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


# ------------------------------------------------------------------------------------------------ videos
def test_missing_and_corrupt_videos_are_refused_before_loading(tmp_path, capsys):
    missing, corrupt = tmp_path / "nope.mp4", tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not really a video" * 50)
    never_loaded = str(tmp_path / "not-even-loaded")
    assert main(["--checkpoint", never_loaded, "--video", str(missing), "--prompt", "hi"]) == 2
    assert error_lines(capsys) == [f"owl-chat: error: cannot read video {str(missing)!r}: no such file"]
    assert main(["--checkpoint", never_loaded, "--video", VIDEO_A, "--video", str(corrupt), "--prompt", "hi"]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith(f"owl-chat: error: cannot read video {str(corrupt)!r}: not a readable video")
    assert main(["--checkpoint", never_loaded, "--video", str(tmp_path), "--prompt", "hi"]) == 2
    assert error_lines(capsys) == [f"owl-chat: error: cannot read video {str(tmp_path)!r}: not a regular file"]


@pytest.mark.parametrize("frames", ["1", "two"])
def test_num_frames_below_two_is_an_argparse_error(frames, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--checkpoint", "unused", "--video", VIDEO_A, "--num-frames", frames, "--prompt", "hi"])
    assert caught.value.code == 2
    assert "argument --num-frames: invalid value" in capsys.readouterr().err


def test_videos_are_refused_by_an_image_layout_checkpoint(checkpoint, capsys, monkeypatch):
    assert main(["--checkpoint", checkpoint, "--video", VIDEO_A, "--prompt", "hi"]) == 2
    assert error_lines(capsys) == [
        f"owl-chat: error: cannot use video {VIDEO_A!r}: checkpoint is an image-layout checkpoint"
    ]
    assert FakeSession.asked == []
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/video {VIDEO_A}\nhi\n"))
    assert main(["--checkpoint", checkpoint]) == 1  # the refused /video line; the question is still answered
    assert error_lines(capsys) == [f"error: cannot use video {VIDEO_A!r}: checkpoint is an image-layout checkpoint"]
    assert FakeSession.asked == [("hi", [])]


def test_videos_reach_the_session_in_the_order_attached(video_checkpoint, capsys, monkeypatch):
    image = str(VIDEO_FIXTURE / "images" / "b.png")
    args = ["--checkpoint", video_checkpoint, "--num-frames", "3"]
    assert main([*args, "--image", image, "--video", VIDEO_A, "--prompt", "what?"]) == 0
    assert FakeSession.options["num_frames"] == 3 and FakeSession.kinds == [["image", "video"]]
    ((question, (first, frames)),) = FakeSession.asked
    assert (question, first) == ("what?", image)
    np.testing.assert_array_equal(frames, read_frames(VIDEO_A, 3))  # read once, before loading, then passed on
    capsys.readouterr()
    FakeSession.asked, FakeSession.kinds = [], []
    lines = f"/video {VIDEO_A}\n/image {image}\n/video missing.mp4\n/video\nfirst\nsecond\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert main(args) == 1  # piped input with refused lines exits 1
    assert FakeSession.kinds == [["video", "image"], []]  # attached to the next question only
    assert [q for q, _ in FakeSession.asked] == ["first", "second"]
    assert FakeSession.asked[0][1][0].shape == (3, 224, 224, 3)
    errors = error_lines(capsys)
    assert "error: cannot read video 'missing.mp4': no such file" in errors
    assert "error: cannot read video '': no path given (/video PATH)" in errors


def test_python_dash_m_owl_jax_chat_is_the_same_command(tmp_path):
    missing = tmp_path / "nope.mp4"
    command = ["-m", "owl_jax.chat", "--checkpoint", str(tmp_path), "--video", str(missing), "--prompt", "hi"]
    result = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert f"cannot read video {str(missing)!r}: no such file" in result.stderr
