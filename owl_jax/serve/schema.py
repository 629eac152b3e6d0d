"""The OpenAI chat-completion API as pydantic models: what the server answers, and what requests hold.

Every response body the server sends is built from these models (`owl_jax.serve.answers` and
`owl_jax.serve.app`), so its shape is written down in one place and published in `GET /openapi.json`.
The request models describe the body of `POST /v1/chat/completions` for that schema; the body itself is
validated by `owl_jax.serve.protocol`, whose refusals name the offending field (`param`, e.g.
`messages[0].content[1].image_url`) in the way OpenAI's do, and whose rules (markers in text, media
counts, the server's limits) are more than types. Unknown request fields are ignored, as OpenAI's
clients send fields this server does not use.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


# --------------------------------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every refusal: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


# ------------------------------------------------------------------------------------------- requests
class MediaUrl(BaseModel):
    url: str = Field(
        description="a data: URL (base64); a local path with --allow-local-files; http(s) from allowed hosts"
    )
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: MediaUrl | str | None = None
    video_url: MediaUrl | str | None = Field(None, description="video checkpoints only")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of `POST /v1/chat/completions`."""

    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    model: str | None = Field(None, description="the served model's id, or left out")
    n: int = Field(1, ge=1, description="choices, each a generation of its own (seed + i)")
    max_tokens: int | None = Field(None, ge=1, description="at most the server's --max-new-tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="an extension: 0 keeps every token")
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = Field(False, description="needs a batching server (--slots above 0) and no beam search")
    top_logprobs: int = Field(0, ge=0, le=20)
    best_of: int | None = Field(None, ge=1, le=8, description="beam search with this many beams")
    num_beams: int | None = Field(None, ge=1, le=8, description="an extension: the same as best_of")


# ------------------------------------------------------------------------------------------ responses
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    """A streamed piece of a choice: only the fields it has are sent (`{}` in a choice's last chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; the usage chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def body(self) -> dict:
        """The JSON object sent (`usage` only in the usage chunk)."""
        out = self.model_dump()
        if self.usage is None:
            del out["usage"]
        return out


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "owl_jax"
    input_modalities: list[str] = Field(description="the content parts requests may hold")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "stopping"]
