"""The one exception type the server turns into an OpenAI-style error response."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, a message for the client, and OpenAI's error `type`.

    `code` is OpenAI's optional machine-readable code (e.g. "model_not_found", "context_length_exceeded").
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}` as OpenAI sends it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
