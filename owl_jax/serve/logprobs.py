"""Log-probability entries in the OpenAI shape, from the slot decoder's per-token `TokenLogprob`.

An entry is `{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}`. A token's
text is what it adds after another token: `decode([t, t])` minus `decode([t])`, so SentencePiece's word
marker shows as the leading space it stands for (decoding a token alone drops it). A byte-fallback piece
that is only part of a UTF-8 character has no text of its own; it shows as U+FFFD.
"""

from __future__ import annotations

from collections.abc import Callable

from owl_jax.inference.slot_batch import TokenLogprob


class TokenTexts:
    """Token id → its text, read through `decode` (ids → text) once per id and remembered."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            one, two = self.decode([token]), self.decode([token, token])
            text = two[len(one) :] if len(two) > len(one) and two.startswith(one) else one
            self._texts[token] = text
        return text

    def item(self, token: int, logprob: float) -> dict:
        text = self(int(token))
        return {"token": text, "logprob": float(logprob), "bytes": list(text.encode("utf-8"))}

    def entry(self, token: int, logprob: TokenLogprob, top: int) -> dict:
        """The entry of generated `token`, with its `top` (0..N) most likely alternatives."""
        alternatives = [self.item(t, lp) for t, lp in zip(logprob.top_ids[:top], logprob.top_logprobs[:top])]
        return {**self.item(token, logprob.logprob), "top_logprobs": alternatives}
