"""The HTTP server: OpenAI-format answers equal to `Generator.generate`, streaming, errors, concurrency, the page.

A real server runs on a free port in a background thread with the tiny fixture model; requests go through
`http.client` like any client's. Expected answers come from a separate `Generator` with greedy decoding.
"""

import base64
import http.client
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

import owl_jax
from browser import ask_in_page, browser_or_skip
from helpers import FIXTURE, VIDEO_FIXTURE, png_claiming
from owl_jax.data.prompts import SYSTEM, build_conversation
from owl_jax.inference.generate import GenerationConfig, Generator
from owl_jax.serve import make_server
from owl_jax.serve.worker import TextStream

MAX_NEW = 8  # the test server's --max-new-tokens: the default length of every answer below
NAME = "owl-tiny"
IMAGE_A, IMAGE_B = FIXTURE / "images" / "a.png", FIXTURE / "images" / "b.png"
QUESTION = "What is drawn in the upper left corner of this picture?"


def data_url(path_or_bytes, mime="image/png") -> str:
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else pathlib.Path(path_or_bytes).read_bytes()
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def user(text, *urls):
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}],
    }


@pytest.fixture(scope="module")
def model_and_processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    shutil.copy(FIXTURE / "tokenizer.model", folder / "tokenizer.model")
    model, processor = owl_jax.from_pretrained(folder, show_progress=False)
    return model, processor, folder


def start(model, processor, **options):
    server = make_server(model, processor, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(10)
    assert not thread.is_alive() and not server.worker.is_alive()


@pytest.fixture(scope="module")
def server(model_and_processor):
    model, processor, _ = model_and_processor
    # a.png (1292x1296) fits under the pixel limit, a 1500x1500 image does not; a.png's request fits the body limit.
    srv, thread = start(
        model, processor, model_name=NAME, max_new_tokens=MAX_NEW, max_body_bytes=2**21, max_image_pixels=2_000_000
    )
    yield srv
    stop(srv, thread)


@pytest.fixture(scope="module")
def expected(model_and_processor):
    """`expected(turns, images, system)` → the greedy answer of `Generator.generate` for that conversation."""
    model, processor, _ = model_and_processor
    generator = Generator(model)
    config = GenerationConfig(
        max_new_tokens=MAX_NEW,
        eos_token_id=processor.eos_token_id,
        pad_token_id=processor.pad_token_id,
        bos_token_id=processor.bos_token_id,
    )
    cache = {}

    def answer(turns, images=(), system=SYSTEM):
        key = (tuple(turns), tuple(map(str, images)), system)
        if key not in cache:
            inputs = processor(build_conversation(turns, system), list(images))
            out = generator.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], config)
            cache[key] = processor.decode([t for t in out.tokens[0] if t != processor.eos_token_id]).strip()
        return cache[key]

    return answer


def request(server, method, path, body=None, headers=None, raw=None):
    """`(status, headers, body bytes)` of one request on a fresh connection."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers={**hdrs, **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def chat(server, messages, **options):
    status, _, body = request(
        server, "POST", "/v1/chat/completions", {"messages": messages, "temperature": 0, **options}
    )
    assert status == 200, body
    return json.loads(body)


def chat_stream(server, messages, **options):
    """The parsed `data:` payloads of a streamed completion (the final "[DONE]" kept as a string)."""
    status, headers, body = request(
        server, "POST", "/v1/chat/completions", {"messages": messages, "temperature": 0, "stream": True, **options}
    )
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/event-stream")
    events = body.decode("utf-8").split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: "), event
        data = event[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def error_of(status_body, status):
    got, _, body = status_body
    assert got == status, body
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    return error


# ------------------------------------------------------------------------------------------- answers
def test_completion_matches_generate(server, expected, model_and_processor):
    processor = model_and_processor[1]
    out = chat(server, [user(QUESTION, data_url(IMAGE_A))])
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == NAME and isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    answer = choice["message"]["content"]
    assert isinstance(answer, str) and answer
    assert answer == expected([(1, QUESTION, None)], [IMAGE_A])
    prompt_tokens = len(processor.encode_prompt(build_conversation([(1, QUESTION, None)])))
    usage = out["usage"]
    assert usage["prompt_tokens"] == prompt_tokens and 1 <= usage["completion_tokens"] <= MAX_NEW
    assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    assert choice["finish_reason"] == ("length" if usage["completion_tokens"] == MAX_NEW else "stop")


def test_streaming_adds_up_to_the_completion(server):
    messages = [user(QUESTION, data_url(IMAGE_A))]
    whole = chat(server, messages)
    events = chat_stream(server, messages, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len(chunks) > 3  # the text arrived in pieces, not in one final chunk
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_multi_turn_conversation_uses_the_template(server, expected):
    system = "You describe pictures."
    first = expected([(1, QUESTION, None)], [IMAGE_A], system)
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image_url", "image_url": data_url(IMAGE_A)}]},  # plain string
        {"role": "user", "content": QUESTION},  # merged with the image message into one turn
        {"role": "assistant", "content": first},
        user("And this one?", data_url(IMAGE_B)),
    ]
    out = chat(server, messages)
    turns = [(1, QUESTION, first), (1, "And this one?", None)]
    assert out["choices"][0]["message"]["content"] == expected(turns, [IMAGE_A, IMAGE_B], system)


def test_concurrent_requests_are_not_mixed(server, expected):
    jobs = {
        "a": ([user(QUESTION, data_url(IMAGE_A))], expected([(1, QUESTION, None)], [IMAGE_A])),
        "b": (
            [user("Which colour is the largest circle?", data_url(IMAGE_B))],
            expected([(1, "Which colour is the largest circle?", None)], [IMAGE_B]),
        ),
    }
    results, barrier = {}, threading.Barrier(4)

    def run(key, streamed):
        barrier.wait()
        if streamed:
            chunks = chat_stream(server, jobs[key][0])[:-1]
            results[key, streamed] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        else:
            results[key, streamed] = chat(server, jobs[key][0])["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=run, args=(k, s)) for k in jobs for s in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert expected([(1, QUESTION, None)], [IMAGE_A]) != jobs["b"][1]  # the two answers can be told apart
    assert results == {(k, s): jobs[k][1] for k in jobs for s in (False, True)}


def test_sampling_with_a_seed_is_reproducible(server):
    messages = [user(QUESTION, data_url(IMAGE_A))]
    options = dict(temperature=1.0, top_p=0.9, top_k=20, seed=7, max_tokens=6)
    a = chat(server, messages, **options)["choices"][0]["message"]["content"]
    b = chat(server, messages, **options)["choices"][0]["message"]["content"]
    assert a == b and chat(server, messages, max_tokens=6)["usage"]["completion_tokens"] <= 6


# ------------------------------------------------------------------------------------- other routes
def test_models_health_and_page(server):
    status, _, body = request(server, "GET", "/v1/models")
    assert status == 200 and json.loads(body)["object"] == "list"
    assert [m["id"] for m in json.loads(body)["data"]] == [NAME]
    assert json.loads(request(server, "GET", f"/v1/models/{NAME}")[2])["id"] == NAME
    assert request(server, "GET", "/health")[:3:2] == (200, b'{"status":"ok"}')
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    page = body.decode()
    for marker in ('id="image"', 'id="question"', 'id="send"', 'id="messages"', "/v1/chat/completions"):
        assert marker in page
    assert "http://" not in page and "https://" not in page  # no external resources


# ---------------------------------------------------------------------------------------- bad requests
def png_bytes(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_requests(server):
    post = lambda body, **kw: request(server, "POST", "/v1/chat/completions", body, **kw)
    hi = [{"role": "user", "content": "hi"}]
    error_of(post(None, raw=b'{"messages": [}'), 400)
    error_of(post(None, raw=b"\xff\xfe not json"), 400)
    error_of(post({"messages": hi}, headers={"Content-Type": "text/plain"}), 415)
    for messages in (
        None,
        [],
        "hi",
        [{"role": "robot", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": [{"type": "audio"}]}],
        hi + [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "a <image> b"}],
    ):
        error_of(post({"messages": messages}), 400)
    assert error_of(post({"messages": hi, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    assert chat(server, hi, model=NAME)["model"] == NAME
    for options in (
        {"temperature": -1},
        {"temperature": "hot"},
        {"top_p": 0},
        {"max_tokens": 0},
        {"n": 9},
        {"n": 0},
        {"max_tokens": MAX_NEW + 1},
        {"stream": "yes"},
        {"stop": [""]},
        {"best_of": 2, "temperature": 0.5},
    ):
        error_of(post({"messages": hi, **options}), 400)
    image = lambda url: {"messages": [user("What?", url)]}
    for url in (
        "data:image/png;base64,@@not-base64@@",
        "data:image/png,rawbytes",
        "data:image/png;base64",
        data_url(b"not an image at all"),
        data_url(png_bytes(8, 8), "text/html"),
        "https://example.com/a.png",
        str(IMAGE_A),
        "file://" + str(IMAGE_A),
    ):
        assert "image" in error_of(post(image(url)), 400)["message"].lower()
    # Too many pixels: a 1-kB file whose header claims 30000x30000, and a real image over the server's limit.
    assert error_of(post(image(data_url(png_claiming(30000, 30000)))), 413)["code"] == "image_too_large"
    assert error_of(post(image(data_url(png_bytes(1500, 1500)))), 413)["code"] == "image_too_large"
    long_text = " ".join(["word"] * 2500)  # more tokens than the tiny model's 2048 positions
    assert (
        error_of(post({"messages": [{"role": "user", "content": long_text}]}), 400)["code"] == "context_length_exceeded"
    )
    error_of(request(server, "GET", "/nothing-here"), 404)
    status, headers, _ = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and headers["Allow"] == "POST"
    error_of(request(server, "DELETE", "/health"), 405)
    assert chat(server, hi)["choices"][0]["message"]["content"] is not None  # still serving


def test_video_parts_are_refused_by_an_image_layout_model(server, expected):
    card = json.loads(request(server, "GET", f"/v1/models/{NAME}")[2])
    assert card["input_modalities"] == ["text", "image"]
    clip = data_url(VIDEO_FIXTURE / "videos" / "a.mp4", "video/mp4")
    parts = [{"type": "video_url", "video_url": {"url": clip}}, {"type": "text", "text": "What moves?"}]
    error = error_of(
        request(server, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": parts}]}), 400
    )
    assert error["param"] == "messages[0].content[0].video_url"
    assert error["message"].startswith("messages[0].content[0] is a video_url part, but this model takes no videos")
    # For the image layout "<|video|>" is ordinary text, as in the released image model.
    answer = chat(server, [{"role": "user", "content": "What is <|video|>?"}])["choices"][0]["message"]["content"]
    assert answer == expected([(0, "What is <|video|>?", None)])


def test_body_over_the_limit_is_refused_before_reading(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")  # announce 1 GB but send nothing: the answer must not wait for it
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2**30))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    # A client that sends its whole (too large) body first still gets the 413, not a reset connection.
    body = json.dumps({"messages": [user("What?", data_url(b"\0" * (3 * 2**20)))]}).encode()
    error_of(request(server, "POST", "/v1/chat/completions", raw=body), 413)


def test_local_files_only_when_allowed(server, model_and_processor, expected):
    messages = [user(QUESTION, str(IMAGE_A))]
    assert (
        "--allow-local-files"
        in error_of(request(server, "POST", "/v1/chat/completions", {"messages": messages}), 400)["message"]
    )
    model, processor, _ = model_and_processor
    local, thread = start(
        model, processor, model_name=NAME, max_new_tokens=MAX_NEW, allow_local_files=True, generator=server.generator
    )
    try:
        want = expected([(1, QUESTION, None)], [IMAGE_A])
        assert chat(local, messages)["choices"][0]["message"]["content"] == want
        assert chat(local, [user(QUESTION, IMAGE_A.as_uri())])["choices"][0]["message"]["content"] == want
        missing = request(local, "POST", "/v1/chat/completions", {"messages": [user("?", str(IMAGE_A) + ".nope")]})
        error_of(missing, 400)
    finally:
        stop(local, thread)


def test_text_stream_holds_back_partial_characters_and_trailing_space():
    pieces = {5: "▁Caf", 6: "é", 7: "\n", 8: "<0xE2>", 9: "<0x82>", 10: "<0xAC>", 2: "</s>"}

    def decode(ids):  # a toy SentencePiece: "▁" is a space, <0x..> pieces are UTF-8 bytes, text stripped at start
        out = b"".join(
            bytes([int(pieces[i][3:5], 16)]) if pieces[i].startswith("<0x") else pieces[i].replace("▁", " ").encode()
            for i in ids
            if i != 2
        )
        return out.decode("utf-8", errors="replace").lstrip(" ")

    stream = TextStream(decode, eos_token_id=2)
    sent = [stream.push(t) for t in (5, 6, 7, 8, 9)]
    assert sent == ["Caf", "é", "", "", ""]  # the newline and the half-built "€" wait
    assert stream.push(10) == "\n€"
    assert stream.push(7) + stream.push(2) + stream.finish() == ""  # a trailing newline is never sent
    assert stream.text == decode([5, 6, 7, 8, 9, 10, 7]).strip()


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_serves_and_stops_on_sigterm(model_and_processor):
    """`owl-serve` serves; SIGTERM with a stream in flight ends that stream with an error event and [DONE]
    (after --shutdown-grace) and exits 0 without a traceback."""
    folder = model_and_processor[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(pathlib.Path(owl_jax.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "owl_jax.serve", "--checkpoint", str(folder), "--port", "0"]
        + ["--max-new-tokens", "2000", "--shutdown-grace", "0.2"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "the server exited before it was ready"
            if " on http://" in line:
                url = line.split(" on ", 1)[1].split()[0]
        host, port = url[len("http://") :].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == folder.name
        conn.close()
        # A long sampled answer (seed 3: ~1900 tokens of the tiny model), in flight when SIGTERM comes.
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        request = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "seed": 3, "max_tokens": 2000}
        conn.request("POST", "/v1/chat/completions", json.dumps(request), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        for _ in range(2):  # the role chunk and the first text
            assert response.readline().startswith(b"data: {") and response.readline() == b"\n"
        proc.send_signal(signal.SIGTERM)
        events = [e for e in response.read().decode().split("\n\n") if e]
        conn.close()
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: ") :])["error"]["message"] == "the server is shutting down"
        assert proc.wait(timeout=60) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# ------------------------------------------------------------------------------------------- browser
def test_web_page_chat_in_headless_chromium(server, expected, tmp_path):
    from selenium.webdriver.common.by import By

    browser = browser_or_skip(tmp_path)
    try:
        browser.get(server.url + "/")
        assert not browser.find_element(By.ID, "video-picker").is_displayed()  # an image-layout model
        # The page sends temperature 0 (its default) and no max_tokens: the server's greedy answer.
        first = ask_in_page(browser, QUESTION, IMAGE_A)
        assert first and first == expected([(1, QUESTION, None)], [IMAGE_A])
        second = ask_in_page(browser, "And the lower right corner?")  # the page keeps the conversation
        assert second == expected([(1, QUESTION, first), (0, "And the lower right corner?", None)], [IMAGE_A])
        assert browser.find_elements(By.CSS_SELECTOR, "#messages .user img")  # the picked image is shown
    finally:
        browser.quit()
