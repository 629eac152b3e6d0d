"""A multi-turn, multi-image conversation that keeps its KV cache between turns.

Each turn re-tokenizes the whole conversation in the released template (so its ids are exactly those of
re-encoding it from scratch), keeps the cached keys/values of the longest prefix the cache already holds,
and prefills only the rest: usually just the new question (and its images, encoded once when added). When
re-tokenizing changes earlier tokens (the model's answer, detokenized and retokenized, can differ from what
it generated) the cache is reused up to the first difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.data.prompts import build_conversation
from owl_jax.inference.generate import GenerationConfig, Generator, round_up
from owl_jax.modeling.llama import KVCache
from owl_jax.modeling.owl import check_image_placeholders


@dataclasses.dataclass
class _Turn:
    num_images: int
    question: str
    answer: str | None = None


class ChatSession:
    """Talk to the model; `ask` returns the answer and keeps the conversation (and cache) for the next turn.

    Args:
      generator: the model's `Generator`.
      processor: its `OwlProcessor` (tokenizer and image preprocessing).
      max_length: cache slots for the whole conversation (prompt and answers).
      config: default decoding options (`ask` may override per turn).
    """

    def __init__(
        self,
        generator: Generator,
        processor: Any,
        *,
        max_length: int = 2048,
        config: GenerationConfig = GenerationConfig(max_new_tokens=256),
    ):
        self.generator, self.processor = generator, processor
        self.max_length = round_up(max_length, generator.cache_bucket)
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, its images and its cache."""
        self.turns: list[_Turn] = []
        self.image_embeds: list[jax.Array] = []
        self.cache: KVCache | None = None
        self.key_valid: jax.Array | None = None
        self.cached_ids: list[int] = []  # the tokens whose keys/values the cache holds, in slot order

    @property
    def prompt(self) -> str:
        """The conversation so far in the released template (ending with "AI: " while a turn is open)."""
        return build_conversation([(t.num_images, t.question, t.answer) for t in self.turns])

    def add_images(self, images: Sequence[Any]) -> int:
        """Preprocess and encode images for the next question; returns how many are waiting."""
        if images:
            pixels = self.processor.preprocess_images(list(images))
            embeds = self.generator.encode_images(pixels)
            self.image_embeds.extend(embeds[i] for i in range(len(pixels)))
        return len(self.image_embeds) - sum(t.num_images for t in self.turns)

    def ask(
        self,
        question: str,
        images: Sequence[Any] = (),
        *,
        config: GenerationConfig | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """Add a turn with `question` (and `images`), generate the answer and return it.

        `stream` receives each new piece of the answer's text as it is decoded.
        """
        cfg = (config or self.config).validate()
        pending = self.add_images(images)
        self.turns.append(_Turn(pending, question))
        try:
            return self._answer(cfg, stream)
        except BaseException:
            self.turns.pop()
            raise

    def _answer(self, cfg: GenerationConfig, stream: Callable[[str], None] | None) -> str:
        ids = self.processor.encode_prompt(self.prompt)
        check_image_placeholders(np.asarray([ids]), len(self.image_embeds), self.generator.model.config.image_tokens)
        if len(ids) + cfg.max_new_tokens > self.max_length:
            raise ValueError(
                f"the conversation needs {len(ids) + cfg.max_new_tokens} positions but the session has "
                f"{self.max_length}; reset() it or start one with a larger max_length"
            )
        start = self._reusable_prefix(ids)
        if self.cache is None:
            self.cache = self.generator.new_cache(1, self.max_length)
            self.key_valid = jnp.zeros((1, self.max_length), bool)
        suffix = ids[start:]
        first_image = sum(1 for i, t in enumerate(ids[:start]) if t < 0 and (i == 0 or ids[i - 1] >= 0))
        n_new_images = sum(1 for i, t in enumerate(suffix) if t < 0 and (i == 0 or suffix[i - 1] >= 0))
        embeds = jnp.stack(self.image_embeds[first_image : first_image + n_new_images]) if n_new_images else None
        width = round_up(len(suffix), self.generator.prompt_bucket)
        padded = np.full((1, width), cfg.pad_token_id, np.int32)
        padded[0, : len(suffix)] = suffix
        gen = self.generator
        with gen._ctx():
            logits, self.cache, self.key_valid = gen.extend(
                gen.graphdef,
                gen.state,
                self.cache,
                self.key_valid,
                jnp.asarray(padded),
                jnp.int32(len(suffix)),
                jnp.int32(start),
                embeds,
            )
        pieces: list[str] = []

        def on_token(step: int, tokens: np.ndarray, finished: np.ndarray) -> None:
            if stream is None:
                return
            generated.append(int(tokens[0]))
            text = self.processor.decode([t for t in generated if t != cfg.eos_token_id])
            new = text[len("".join(pieces)) :]
            if new:
                pieces.append(new)
                stream(new)

        generated: list[int] = []
        tokens, _, self.cache, self.key_valid = gen.decode_loop(
            logits, self.cache, self.key_valid, np.array([len(ids)]), len(ids), cfg, on_token
        )
        answer_ids = tokens[0]
        self.cached_ids = ids + answer_ids[:-1]
        answer = self.processor.decode([t for t in answer_ids if t != cfg.eos_token_id]).strip()
        self.turns[-1].answer = answer
        return answer

    def _reusable_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the cache already holds (never inside an image run, and at
        least one token is left to prefill so there are logits to start from)."""
        n = 0
        limit = min(len(self.cached_ids), len(ids) - 1)
        while n < limit and self.cached_ids[n] == ids[n]:
            n += 1
        while n > 0 and ids[n] < 0 and ids[n - 1] < 0:  # do not split an image run
            n -= 1
        return n
