"""OpenAI chat-completion requests → the released mPLUG-Owl template, images, videos and decoding options.

Messages map onto `build_conversation`: every user message becomes a turn whose media get `Human: <image>`
(an `image_url` part) or `Human: <|video|>` (a `video_url` part, for a video-layout model) lines before its
question, in the order of the parts; the assistant message after it is that turn's answer, and the last
message must come from the user (its answer is what the model writes). Consecutive messages of one role are
merged (texts joined by newlines), so a client may send an image and its question as two user messages.
System messages (before the first user message) replace the template's system sentence. Text may not hold
the markers themselves: every marker in the prompt has its medium behind it.

The decoding and response options are read by `owl_jax.serve.options`. Every refusal is an `ApiError` 400
whose `param` names the field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from PIL import Image

from owl_jax.data.prompts import IMAGE_MARKER, SYSTEM, VIDEO_MARKER, build_conversation
from owl_jax.inference.generate import GenerationConfig
from owl_jax.serve.errors import ApiError
from owl_jax.serve.options import parse_options

ROLES = ("system", "user", "assistant")
MEDIA_PARTS = {"image_url": "image", "video_url": "video"}  # content part type → medium
MARKERS = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}


@dataclasses.dataclass
class ChatRequest:
    """A validated request: the prompt in the released template, its images and videos (each in prompt
    order), and options."""

    prompt: str
    images: list[Image.Image]
    config: GenerationConfig
    stream: bool
    include_usage: bool  # stream_options.include_usage: send a usage chunk before [DONE]
    max_tokens_given: bool  # whether the client chose max_tokens (else the server's default may be shortened)
    videos: list[Any] = dataclasses.field(default_factory=list)  # what `load_video` returned, per video
    n: int = 1  # choices: generations seeded config.seed + i
    logprobs: bool = False  # send each answer token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives at each position


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def parse_json_body(data: bytes) -> Any:
    """A request body → its JSON value (UTF-8, -16 or -32); ApiError 400 saying why it is not JSON."""
    try:
        return json.loads(data)
    except ValueError as e:  # JSONDecodeError, undecodable bytes, integers of over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None


def _is_text(value: str) -> bool:
    """Whether `value` is encodable Unicode text (JSON's `\\ud800` escapes decode to lone surrogates, which are not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_lone_surrogate(body: Any) -> str | None:
    """The path (`messages[0].content`) of the first string, or key, in a parsed JSON body that holds a lone
    surrogate (U+D800-U+DFFF, e.g. from the escape `"\\ud800"`), or None. Walks without recursion."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return path or "the request body"
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                name = f"{path}.{key}" if path else str(key)
                if isinstance(key, str) and not _is_text(key):
                    return f"a key of {path}" if path else "a top-level key"
                items.append((item, name))
            stack.extend(reversed(items))  # depth first, in document order
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None


def _content_parts(content: Any, where: str) -> list[dict]:
    """A message's content as a list of parts (a string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return content
    raise _bad(
        f"{where}.content must be a string or a list of content parts, got {type(content).__name__}", f"{where}.content"
    )


def _media_url(part: dict, key: str, where: str) -> str:
    value = part.get(key)
    if isinstance(value, dict):  # the OpenAI form {"url": ..., "detail": ...}
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise _bad(f'{where}.{key} must be a URL string or {{"url": ...}}', f"{where}.{key}")
    return value


# One medium of a message: (kind "image" or "video", its URL, where it is: "messages[i].content[j]").
Media = tuple[str, str, str]


def _split_message(message: Any, where: str, takes_videos: bool) -> tuple[str, str, list[Media]]:
    """`(role, text, media)` of one message."""
    if not isinstance(message, dict):
        raise _bad(f"{where} must be an object with 'role' and 'content'", where)
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", f"{where}.role")
    if "content" not in message:
        raise _bad(f"{where} has no content", f"{where}.content")
    texts, media = [], []
    for j, part in enumerate(_content_parts(message["content"], where)):
        kind, here = part.get("type"), f"{where}.content[{j}]"
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{here}.text must be a string", f"{where}.content")
            texts.append(part["text"])
        elif isinstance(kind, str) and kind in MEDIA_PARTS:
            medium = MEDIA_PARTS[kind]
            if role != "user":
                raise _bad(f"{where}: only user messages may contain {medium}s", f"{where}.content")
            if medium == "video" and not takes_videos:
                raise _bad(
                    f"{here} is a video_url part, but this model takes no videos (an image-layout checkpoint); "
                    "send images, or serve a video checkpoint",
                    f"{here}.video_url",
                )
            media.append((medium, _media_url(part, kind, here), here))
        else:
            parts = "'text', 'image_url' or 'video_url'" if takes_videos else "'text' or 'image_url'"
            raise _bad(f"{here} has unsupported type {kind!r}; use {parts}", f"{where}.content")
    text = "\n".join(t.strip() for t in texts if t.strip())
    for medium, marker in MARKERS.items():
        if marker in text and (medium == "image" or takes_videos):
            raise _bad(
                f"{where} contains the text {marker!r}, which is reserved for {medium}s; send {medium}s as "
                f"{medium}_url parts",
                f"{where}.content",
            )
    return role, text, media


def parse_messages(messages: Any, takes_videos: bool = False) -> tuple[str, list[tuple[list[Media], str, str | None]]]:
    """`(system sentence, turns)` where each turn is `(media, question, answer or None)`; `media` are
    `(kind, url, where)` in order. `takes_videos`: whether `video_url` parts (and the `<|video|>` marker)
    mean videos; otherwise video parts are refused."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of messages", "messages")
    system: list[str] = []
    turns: list[list] = []  # [media, question, answer]
    previous = None
    for i, message in enumerate(messages):
        role, text, urls = _split_message(message, f"messages[{i}]", takes_videos)
        if role == "system":
            if turns:
                raise _bad(f"messages[{i}]: system messages must come before the conversation", "messages")
            system.append(text)
        elif role == "user":
            if previous == "user":  # e.g. an image message followed by its question
                turns[-1][0] += urls
                turns[-1][1] = "\n".join(t for t in (turns[-1][1], text) if t)
            else:
                turns.append([list(urls), text, None])
        else:
            if not turns:
                raise _bad(f"messages[{i}]: an assistant message must follow a user message", "messages")
            turns[-1][2] = text if previous != "assistant" else "\n".join(t for t in (turns[-1][2], text) if t)
        previous = role
    if previous != "user":
        raise _bad("the last message must come from the user (the model answers it)", "messages")
    for i, (urls, question, _) in enumerate(turns):
        if not urls and not question:
            raise _bad(f"user turn {i} has neither text nor media", "messages")
    text = "\n".join(s for s in system if s)
    return (text if system else SYSTEM), [(u, q, a) for u, q, a in turns]


def parse_chat_request(
    body: Any,
    *,
    model_name: str,
    load_image: Callable[[str, str], Image.Image],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    max_images: int | None = None,
    load_video: Callable[[str, str], Any] | None = None,
) -> ChatRequest:
    """Validate a `/v1/chat/completions` body; ApiError for anything the server cannot serve.

    Args:
      load_image: `(url, name) → RGB image`, raising ApiError for refused or unreadable images.
      max_images: the most media (images and videos) a conversation can hold (their tokens must fit the
        context); more are refused before any is decoded.
      load_video: `(url, name) → the video` (e.g. its frames), raising ApiError for refused or unreadable
        videos; None when the model takes no videos (`video_url` parts are then refused).
    """
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    bad_text = find_lone_surrogate(body)
    if bad_text is not None:
        raise _bad(
            f"{bad_text} is not valid Unicode text: it holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
            "escape); send UTF-8 text",
            bad_text,
        )
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {model_name!r}",
            code="model_not_found",
            param="model",
        )
    system, turns = parse_messages(body.get("messages"), takes_videos=load_video is not None)
    options = parse_options(
        body,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
    )
    kinds = [kind for media, _, _ in turns for kind, _, _ in media]
    if max_images is not None and len(kinds) > max_images:
        videos = kinds.count("video")
        what = f"{len(kinds) - videos} images and {videos} videos" if videos else f"{len(kinds)} images"
        raise ApiError(
            400,
            f"the conversation has {what}; at most {max_images} fit the model's context",
            code="context_length_exceeded",
            param="messages",
        )
    loaded: dict[str, list] = {"image": [], "video": []}
    layout = []
    for media, question, answer in turns:
        for kind, url, where in media:
            n = len(loaded[kind]) + 1
            name = f"image {n}" if kind == "image" else f"video {n} ({where})"
            try:
                loaded[kind].append((load_image if kind == "image" else load_video)(url, name))
            except ApiError as e:
                if e.param is None:
                    e.param = f"{where}.{kind}_url"
                raise
        layout.append(([MARKERS[kind] for kind, _, _ in media], question, answer))
    try:
        prompt = build_conversation(layout, system)
    except ValueError as e:  # e.g. an "<image>" marker in the system text
        raise _bad(str(e), "messages") from None
    o = options
    return ChatRequest(
        prompt,
        loaded["image"],
        o.config,
        o.stream,
        o.include_usage,
        o.max_tokens_given,
        loaded["video"],
        o.n,
        o.logprobs,
        o.top_logprobs,
    )
