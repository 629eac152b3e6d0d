"""The server with the video fixture: `video_url` parts answered as `Generator.generate` answers the
processor's inputs, images preprocessed as the video layout does (crop, not squash), refusals naming the
field, temporary files always removed, and the chat page's video picker."""

import base64
import http.client
import json
import os
import threading

import numpy as np
import pytest

import owl_jax.serve.videos
from browser import ask_in_page, browser_or_skip
from helpers import VIDEO_FIXTURE, load_fixture_model
from owl_jax.data.processor import OwlProcessor
from owl_jax.data.prompts import IMAGE_MARKER, VIDEO_MARKER, build_conversation
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.serve import make_server
from owl_jax.serve.errors import ApiError
from owl_jax.serve.videos import load_video_url

MAX_NEW = 6
NAME = "owl-video-tiny"
VIDEO_A, VIDEO_B = VIDEO_FIXTURE / "videos" / "a.mp4", VIDEO_FIXTURE / "videos" / "b.mp4"
IMAGE_A, IMAGE_B = VIDEO_FIXTURE / "images" / "a.png", VIDEO_FIXTURE / "images" / "b.png"


def data_url(path, mime) -> str:
    raw = path if isinstance(path, bytes) else path.read_bytes()
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def part(kind, url):
    return {"type": f"{kind}_url", f"{kind}_url": {"url": url}}


def text(words):
    return {"type": "text", "text": words}


def post(server, body):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def owl():
    model = load_fixture_model(str(VIDEO_FIXTURE / "checkpoint"))
    return model, OwlProcessor.from_pretrained(VIDEO_FIXTURE, config=model.config), Generator(model)


def serve(owl, **options):
    model, processor, generator = owl
    server = make_server(
        model, processor, port=0, model_name=NAME, max_new_tokens=MAX_NEW, generator=generator, **options
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def server(owl):
    srv, thread = serve(owl)
    yield srv
    stop(srv, thread)


@pytest.fixture()
def temp_files(monkeypatch):
    """The paths of the temporary files the server writes videos to, recorded as they are made."""
    made = []
    mkstemp = owl_jax.serve.videos.tempfile.mkstemp

    def record(*args, **kwargs):
        fd, path = mkstemp(*args, **kwargs)
        made.append(path)
        return fd, path

    monkeypatch.setattr(owl_jax.serve.videos.tempfile, "mkstemp", record)
    return made


def expected(owl, turns, images=(), videos=()) -> str:
    """The greedy answer of `Generator.generate` on the processor's inputs for `turns`."""
    _, processor, generator = owl
    inputs = processor(build_conversation(turns), images=list(images), videos=list(videos))
    config = GenerationConfig(
        max_new_tokens=MAX_NEW,
        eos_token_id=processor.eos_token_id,
        bos_token_id=processor.bos_token_id,
        pad_token_id=processor.pad_token_id,
    )
    out = generator.generate(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], config, inputs["video_pixel_values"]
    )
    return processor.decode([t for t in out.tokens[0] if t != processor.eos_token_id]).strip()


def test_video_conversation_equals_generate(server, owl, temp_files):
    """Two turns: a video then an image, an answer, then a second video; the media keep their order."""
    messages = [
        {
            "role": "user",
            "content": [
                part("video", data_url(VIDEO_A, "video/mp4")),
                part("image", data_url(IMAGE_A, "image/png")),
                {"type": "text", "text": "Does the picture show the colours of the video?"},
            ],
        },
        {"role": "assistant", "content": "Yes, the same colours."},
        {"role": "user", "content": [part("video", data_url(VIDEO_B, "video/mp4"))]},
        {"role": "user", "content": "And this one?"},  # merged with the video message into one turn
    ]
    status, body = post(server, {"messages": messages, "temperature": 0})
    assert status == 200, body
    turns = [
        ([VIDEO_MARKER, IMAGE_MARKER], "Does the picture show the colours of the video?", "Yes, the same colours."),
        ([VIDEO_MARKER], "And this one?", None),
    ]
    want = expected(owl, turns, [IMAGE_A], [VIDEO_A, VIDEO_B])
    assert body["choices"][0]["message"]["content"] == want
    prompt_tokens = len(owl[1].encode_prompt(build_conversation(turns)))
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert len(temp_files) == 2 and not any(os.path.exists(p) for p in temp_files)  # written, read, removed


def test_images_follow_the_video_layout(server, owl):
    processor = owl[1]
    image = server.load_image(data_url(IMAGE_B, "image/png"), "image 1")
    assert image.size == (processor.image_size, processor.image_size)
    # The same pixels as the processor's shortest-edge resize and centre crop of the file (846×612), not a squash.
    np.testing.assert_array_equal(processor.preprocess_images([image]), processor.preprocess_images([IMAGE_B]))
    squashed = OwlProcessor(VIDEO_FIXTURE, image_tokens=9, image_size=processor.image_size)
    assert not np.allclose(squashed.preprocess_images([IMAGE_B]), processor.preprocess_images([IMAGE_B]), atol=0.1)
    card = server.model_card()
    assert card["input_modalities"] == ["text", "image", "video"]


def test_video_refusals_name_the_field(server, owl, temp_files):
    def refused(content, status=400):
        got, body = post(server, {"messages": [{"role": "user", "content": content}]})
        assert got == status, body
        return body["error"]

    error = refused([part("video", data_url(b"\0\0\0\x18ftypmp42" + b"junk" * 400, "video/mp4")), text("What moves?")])
    assert error["param"] == "messages[0].content[0].video_url" and error["code"] == "invalid_video"
    assert error["message"].startswith("video 1 (messages[0].content[0]): not a readable video")
    assert "owl-video-" not in error["message"]  # the server's temporary file is not shown
    error = refused([text("What moves?"), part("video", data_url(VIDEO_A, "image/png"))])
    assert error["param"] == "messages[0].content[1].video_url" and "media type 'image/png'" in error["message"]
    error = refused([part("video", str(VIDEO_A)), text("What moves?")])
    assert "--allow-local-files" in error["message"] and error["param"] == "messages[0].content[0].video_url"
    error = refused([part("video", data_url(VIDEO_A, "video/mp4")), text("What is in <|video|>?")])
    assert error["param"] == "messages[0].content" and "'<|video|>'" in error["message"]
    assert len(temp_files) == 1 and not os.path.exists(temp_files[0])  # the junk was written, then removed
    with pytest.raises(ApiError) as caught:  # frames over the pixel limit: 413 from the header
        load_video_url(data_url(VIDEO_A, "video/mp4"), allow_local_files=False, num_frames=4, max_frame_pixels=40_000)
    assert caught.value.status == 413 and caught.value.code == "video_too_large"
    assert len(temp_files) == 2 and not os.path.exists(temp_files[1])


def test_local_video_files_only_when_allowed(owl, server):
    local, thread = serve(owl, allow_local_files=True)
    try:
        messages = [{"role": "user", "content": [part("video", str(VIDEO_B)), text("Why?")]}]
        status, body = post(local, {"messages": messages, "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected(
            owl, [([VIDEO_MARKER], "Why?", None)], [], [VIDEO_B]
        )
        status, body = post(local, {"messages": [{"role": "user", "content": [part("video", str(VIDEO_B) + ".nope")]}]})
        assert status == 400 and "no such file" in body["error"]["message"]
    finally:
        stop(local, thread)


def test_web_page_sends_a_video(server, owl, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = browser_or_skip(tmp_path)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "video-picker").is_displayed())
        answer = ask_in_page(browser, "What is moving?", video=VIDEO_A)
        assert answer == expected(owl, [([VIDEO_MARKER], "What is moving?", None)], [], [VIDEO_A])
        assert browser.find_elements(By.CSS_SELECTOR, "#messages .user video")  # the sent video is shown
    finally:
        browser.quit()
