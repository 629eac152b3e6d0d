"""A request's worker events → its OpenAI answer: one `chat.completion`, or `chat.completion.chunk` events.

A request of `n` choices runs as `n` jobs; each job's events arrive tagged with its choice index:
`("logprob", entry)` before the `("delta", text)` holding that token's text, then `("done", Result)` or
`("error", ApiError)`. `Completion` collects them into one JSON answer (`choices[i].message.content`, and
`choices[i].logprobs.content` when asked for). `ChunkStream` turns them into server-sent events as they
come: a role chunk per choice, a chunk per text piece carrying the log-probabilities of the tokens that
made it (entries of tokens whose text is held back, such as trailing whitespace, ride on a later chunk,
at the latest the choice's last one), a last chunk per choice with its `finish_reason`, the usage chunk
if asked for, and `data: [DONE]`. An error ends a stream with an error event and `data: [DONE]`, as OpenAI
does once the answer's headers are gone.

Usage counts the prompt once (the choices share it, as OpenAI counts) and the completion tokens of all
choices.
"""

from __future__ import annotations

import json
import time
from typing import Any

from owl_jax.serve.errors import ApiError
from owl_jax.serve.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    Usage,
)

DONE = b"data: [DONE]\n\n"
_MARKER = "\ue000owl-text\ue001"  # stands for a chunk's text in its template (private-use characters)


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text stays readable; text that is not valid Unicode is \\u-escaped)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only an ASCII escape can carry it
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def sse(obj: Any) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + encode_json(obj) + b"\n\n"


def usage(results: list[Any]) -> Usage:
    """The usage of a request whose choices ended with `results` (worker `Result`s)."""
    completion = sum(r.completion_tokens for r in results)
    prompt = results[0].prompt_tokens if results else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Choice:
    """One choice's state: text so far, log-probabilities not yet sent, and its `Result` once done."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.logprobs: list[dict] = []
        self.result: Any = None


class Completion:
    """Collects a request's events into one `chat.completion` body (`add` each event, then `body()`).

    Args:
      label: the answer's id (`chatcmpl-...`).
      model: the served model's id.
      n: choices.
      logprobs: whether `choices[i].logprobs` carries the tokens' log-probabilities (else null).
    """

    def __init__(self, label: str, model: str, n: int, logprobs: bool):
        self.label, self.model, self.logprobs = label, model, logprobs
        self.choices = [_Choice() for _ in range(n)]

    def add(self, index: int, kind: str, value: Any) -> None:
        """Record one event of choice `index`; an ("error", ApiError) event raises it."""
        choice = self.choices[index]
        if kind == "error":
            raise value
        if kind == "delta":
            choice.pieces.append(value)
        elif kind == "logprob":
            choice.logprobs.append(value)
        elif kind == "done":
            choice.result = value

    def body(self) -> dict:
        """The `chat.completion` JSON object (every choice must be done)."""
        choices = [
            Choice(
                index=i,
                message=AssistantMessage(content="".join(c.pieces)),
                logprobs=ChoiceLogprobs(content=c.logprobs) if self.logprobs else None,
                finish_reason=c.result.finish_reason,
            )
            for i, c in enumerate(self.choices)
        ]
        answer = ChatCompletion(
            id=self.label,
            created=int(time.time()),
            model=self.model,
            choices=choices,
            usage=usage([c.result for c in self.choices]),
        )
        return answer.model_dump()


class ChunkStream:
    """Turns a request's events into server-sent-event bytes (`start()`, `event(...)` per event).

    `event` returns b"" for what it holds back (log-probabilities wait for their text); after the last
    choice's "done" it returns that choice's last chunk, the usage chunk (with `include_usage`) and
    `data: [DONE]`, and `finished` is true. An "error" event returns the error event and `data: [DONE]`.
    """

    def __init__(self, label: str, model: str, n: int, logprobs: bool, include_usage: bool):
        self.label, self.model, self.logprobs, self.include_usage = label, model, logprobs, include_usage
        self.choices = [_Choice() for _ in range(n)]
        self.created = int(time.time())
        self.finished = False
        self._templates: dict[int, tuple[bytes, ...]] = {}  # choice → text chunk before and after the text

    def _chunk(self, choices: list[ChunkChoice], usage_: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(id=self.label, created=self.created, model=self.model, choices=choices)
        chunk.usage = usage_
        return sse(chunk.body())

    def _text_chunk(self, index: int, text: str) -> bytes:
        """The chunk carrying `text` for choice `index`: `_chunk`'s bytes, made from a template (the chunk of
        a marker text, cut around the marker) when there are no log-probabilities to carry, since a stream
        sends one such chunk per token."""
        if self.logprobs:
            return self._chunk([self._choice(index, Delta(content=text))])
        template = self._templates.get(index)
        if template is None:
            sample = self._chunk([self._choice(index, Delta(content=_MARKER))])
            parts = sample.split(encode_json(_MARKER))
            template = self._templates[index] = (parts[0], parts[1]) if len(parts) == 2 else ()
        try:
            return template[0] + json.dumps(text, ensure_ascii=False).encode("utf-8") + template[1]
        except (IndexError, UnicodeEncodeError):  # no template (the marker came twice), or a lone surrogate
            return self._chunk([self._choice(index, Delta(content=text))])

    def _choice(self, index: int, delta: Delta, finish: str | None = None) -> ChunkChoice:
        logprobs = None
        if self.logprobs:
            held = self.choices[index]
            logprobs, held.logprobs = ChoiceLogprobs(content=held.logprobs), []
        return ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)

    def start(self) -> bytes:
        """The first chunk of each choice: the assistant role, empty content."""
        return b"".join(
            self._chunk([self._choice(i, Delta(role="assistant", content=""))]) for i in range(len(self.choices))
        )

    def event(self, index: int, kind: str, value: Any) -> bytes:
        """The bytes to send for one event of choice `index` (often b"")."""
        choice = self.choices[index]
        if kind == "logprob":
            choice.logprobs.append(value)
            return b""
        if kind == "delta":
            return self._text_chunk(index, value)
        if kind == "error":
            return self.error(value)
        choice.result = value
        out = self._chunk([self._choice(index, Delta(), value.finish_reason)])
        if all(c.result is not None for c in self.choices):
            if self.include_usage:
                out += self._chunk([], usage([c.result for c in self.choices]))
            out += DONE
            self.finished = True
        return out

    def error(self, error: ApiError) -> bytes:
        """The error event and `data: [DONE]`: the stream's end."""
        self.finished = True
        return sse(error.body()) + DONE
