"""A multi-turn conversation with images and videos that keeps its KV cache between turns.

Each turn re-tokenizes the whole conversation in the released template (so its ids are exactly those of
re-encoding it from scratch), keeps the cached keys/values of the longest prefix the cache already holds,
and prefills only the rest: usually just the new question and its media. Images and videos are encoded
once, when they are added, and their embeddings are kept for the rest of the conversation. When
re-tokenizing changes earlier tokens (the model's answer, detokenized and retokenized, can differ from what
it generated) the cache is reused up to the first difference, never from inside a medium's placeholders.

A turn's media keep their order: each gets its own `Human: <image>` or `Human: <|video|>` line before the
question (`owl_jax.data.prompts.build_conversation`). Videos need the video layout (`processor.layout`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.data.prompts import IMAGE_MARKER, VIDEO_MARKER, build_conversation
from owl_jax.inference.generate import GenerationConfig, Generator, round_up
from owl_jax.inference.stops import cut_at_stop, visible_text
from owl_jax.modeling.llama import KVCache
from owl_jax.modeling.owl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, check_media_placeholders

KINDS = {"image": IMAGE_MARKER, "video": VIDEO_MARKER}
_PLACEHOLDERS = {IMAGE_MARKER: IMAGE_PLACEHOLDER, VIDEO_MARKER: VIDEO_PLACEHOLDER}


@dataclasses.dataclass
class _Turn:
    media: tuple[str, ...]  # the markers of the turn's media, in order
    question: str
    answer: str | None = None

    @property
    def num_images(self) -> int:
        return self.media.count(IMAGE_MARKER)


class ChatSession:
    """Talk to the model; `ask` returns the answer and keeps the conversation (and cache) for the next turn.

    Args:
      generator: the model's `Generator`.
      processor: its `OwlProcessor` (tokenizer, image and video preprocessing).
      max_length: cache slots for the whole conversation (prompt and answers).
      config: default decoding options (`ask` may override per turn).
      num_frames: frames sampled from each video file (at least 2; the video layout).
    """

    def __init__(
        self,
        generator: Generator,
        processor: Any,
        *,
        max_length: int = 2048,
        config: GenerationConfig = GenerationConfig(max_new_tokens=256),
        num_frames: int = 4,
    ):
        self.generator, self.processor = generator, processor
        self.max_length = round_up(max_length, generator.cache_bucket)
        self.config = config
        self.num_frames = num_frames
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, its media and its cache."""
        self.turns: list[_Turn] = []
        self.embeds: dict[str, list[jax.Array]] = {IMAGE_MARKER: [], VIDEO_MARKER: []}  # (Q + 1, D) per medium
        self.pending: list[str] = []  # markers of media added for the next question, in order
        self.cache: KVCache | None = None
        self.key_valid: jax.Array | None = None
        self.cached_ids: list[int] = []  # the tokens whose keys/values the cache holds, in slot order

    @property
    def image_embeds(self) -> list[jax.Array]:
        """The conversation's image embeddings in prompt order, each `(Q + 1, D)`."""
        return self.embeds[IMAGE_MARKER]

    @property
    def video_embeds(self) -> list[jax.Array]:
        """The conversation's video embeddings in prompt order, each `(Q + 1, D)`."""
        return self.embeds[VIDEO_MARKER]

    @property
    def prompt(self) -> str:
        """The conversation so far in the released template (ending with "AI: " while a turn is open)."""
        return build_conversation([(list(t.media), t.question, t.answer) for t in self.turns])

    def prompt_with(self, question: str, kinds: Sequence[str] = ()) -> str:
        """The prompt `ask(question)` would send: the conversation, the waiting media, media of `kinds`
        ("image" or "video", in order) not added yet, and the question. ValueError for a question the
        template refuses."""
        turns = [(list(t.media), t.question, t.answer) for t in self.turns]
        markers = [KINDS[kind] for kind in kinds]
        return build_conversation(turns + [(self.pending + markers, question, None)])

    # ------------------------------------------------------------------------------------------ media
    @property
    def supports_video(self) -> bool:
        """Whether the model and processor take videos (the video layout)."""
        return getattr(self.processor, "layout", "image") == "video" and bool(self.generator.model.config.video)

    def add_media(self, media: Sequence[tuple[str, Any]]) -> int:
        """Preprocess and encode `(kind, item)` pairs for the next question, in order; returns how many media
        are waiting.

        `kind` is "image" (a PIL image, a path or a uint8 array) or "video" (a file path, or uint8 frames
        (T, H, W, 3)). Everything is read before anything is encoded, so a medium that cannot be read leaves
        the session as it was. Raises ValueError naming the medium; videos without the video layout are refused.
        """
        media = list(media)
        markers = _markers(media)
        images = [item for kind, item in media if kind == "image"]
        videos = [item for kind, item in media if kind == "video"]
        if videos and not self.supports_video:
            raise ValueError(
                f"{len(videos)} videos were given, but this model is the image layout; videos need a video checkpoint"
            )
        encoded: dict[str, list[jax.Array]] = {}
        if images:
            embeds = self.generator.encode_images(self.processor.preprocess_images(images))
            encoded[IMAGE_MARKER] = [embeds[i] for i in range(len(images))]
        if videos:
            pixels = self.processor.preprocess_videos(videos, self.num_frames)
            embeds = self.generator.encode_videos(pixels)
            encoded[VIDEO_MARKER] = [embeds[i] for i in range(len(videos))]
        for marker, embeds in encoded.items():
            self.embeds[marker].extend(embeds)
        self.pending += markers
        return len(self.pending)

    def add_images(self, images: Sequence[Any]) -> int:
        """`add_media` of images; returns how many media are waiting for the next question."""
        return self.add_media([("image", image) for image in images])

    def add_videos(self, videos: Sequence[Any]) -> int:
        """`add_media` of videos; returns how many media are waiting for the next question."""
        return self.add_media([("video", video) for video in videos])

    # ------------------------------------------------------------------------------------------ turns
    def ask(
        self,
        question: str,
        images: Sequence[Any] = (),
        *,
        videos: Sequence[Any] = (),
        media: Sequence[tuple[str, Any]] = (),
        config: GenerationConfig | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """Add a turn with `question` and its media, generate the answer and return it.

        The turn shows the media waiting from `add_media`, then `media` (`(kind, item)` pairs in any order),
        then `images`, then `videos`. `stream` receives each new piece of the answer's text as it is decoded.
        If generation fails, the turn is dropped and its media wait for the next question. With beam search
        (`config.num_beams` > 1) the beams decode on copies of the cache, `stream` gets the answer once the
        search has ended, and the next turn prefills the answer again.
        """
        cfg = (config or self.config).validate()
        if self.supports_video and VIDEO_MARKER in question:
            raise ValueError(f"the question contains {VIDEO_MARKER!r}; pass videos through videos= or media=")
        new = [*media, *(("image", i) for i in images), *(("video", v) for v in videos)]
        _markers(new)
        self.prompt_with(question, [kind for kind, _ in new])  # a question the template refuses adds no media
        self.add_media(new)
        turn = _Turn(tuple(self.pending), question)
        prompt = self.prompt_with(question)
        self.turns.append(turn)
        self.pending = []
        try:
            return self._answer(prompt, cfg, stream)
        except BaseException:
            self.turns.pop()
            self.pending = list(turn.media)
            raise

    def _answer(self, prompt: str, cfg: GenerationConfig, stream: Callable[[str], None] | None) -> str:
        ids = self.processor.encode_prompt(prompt)
        check_media_placeholders(
            np.asarray([ids]),
            self.generator.model.config.image_tokens,
            num_images=len(self.image_embeds),
            num_videos=len(self.video_embeds),
        )
        if len(ids) + cfg.max_new_tokens > self.max_length:
            raise ValueError(
                f"the conversation needs {len(ids) + cfg.max_new_tokens} positions but the session has "
                f"{self.max_length}; reset() it or start one with a larger max_length"
            )
        start = self._reusable_prefix(ids)
        suffix, embeds = self._new_media(ids, start)
        try:
            return self._run(ids, start, suffix, embeds, cfg, stream)
        except BaseException:
            # The cache was donated to the compiled steps: start the next turn from an empty one.
            self.cache, self.key_valid, self.cached_ids = None, None, []
            raise

    def _run(
        self,
        ids: list[int],
        start: int,
        suffix: list[int],
        embeds: jax.Array | None,
        cfg: GenerationConfig,
        stream: Callable[[str], None] | None,
    ) -> str:
        """Prefill `suffix` (the ids from slot `start` on) over the cache, then decode the answer."""
        if self.cache is None:
            self.cache = self.generator.new_cache(1, self.max_length)
            self.key_valid = jnp.zeros((1, self.max_length), bool)
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
            text = visible_text(self.processor.decode([t for t in generated if t != cfg.eos_token_id]), cfg.stop)
            new = text[len("".join(pieces)) :]
            if new:
                pieces.append(new)
                stream(new)

        generated: list[int] = []
        decode = self.processor.decode if cfg.stop else None
        if cfg.num_beams > 1:  # the beams decode on copies of the cache, which keeps the prompt alone
            hypotheses = gen.beams.run(
                logits, self.cache, self.key_valid, np.array([len(ids)]), len(ids), cfg, decode=decode
            )
            gen.beams.best(hypotheses, cfg, on_token)  # streams the answer once it is known
            answer_ids, self.cached_ids = hypotheses[0][0].tokens, list(ids)
        else:
            tokens, _, self.cache, self.key_valid = gen.decode_loop(
                logits, self.cache, self.key_valid, np.array([len(ids)]), len(ids), cfg, on_token, decode=decode
            )
            answer_ids = tokens[0]
            self.cached_ids = ids + answer_ids[:-1]
        answer = cut_at_stop(self.processor.decode([t for t in answer_ids if t != cfg.eos_token_id]), cfg.stop).strip()
        self.turns[-1].answer = answer
        return answer

    def _new_media(self, ids: list[int], start: int) -> tuple[list[int], jax.Array | None]:
        """The ids to prefill from `start` and the embeddings `(n, Q + 1, D)` of the media runs among them.

        The prefill splices one stream of media embeddings over runs of -1 in order, so video runs (-2) are
        handed over as -1 runs with their videos' embeddings at their places in that stream. Runs of the two
        kinds are never adjacent in the template (each marker has its own `Human:` line), so no two runs merge.
        """
        runs = _runs(ids)
        taken = {IMAGE_PLACEHOLDER: 0, VIDEO_PLACEHOLDER: 0}
        stream: list[jax.Array] = []
        for position, placeholder in runs:
            marker = IMAGE_MARKER if placeholder == IMAGE_PLACEHOLDER else VIDEO_MARKER
            if position >= start:
                stream.append(self.embeds[marker][taken[placeholder]])
            taken[placeholder] += 1
        if any(a < 0 and b < 0 and a != b for a, b in zip(ids[start:], ids[start + 1 :])):
            raise ValueError("an image and a video placeholder run touch; put text between their markers")
        suffix = [IMAGE_PLACEHOLDER if t == VIDEO_PLACEHOLDER else t for t in ids[start:]]
        return suffix, (jnp.stack(stream) if stream else None)

    def _reusable_prefix(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the cache already holds (never inside a media run, and at
        least one token is left to prefill so there are logits to start from)."""
        n = 0
        limit = min(len(self.cached_ids), len(ids) - 1)
        while n < limit and self.cached_ids[n] == ids[n]:
            n += 1
        while n > 0 and ids[n] < 0 and ids[n - 1] == ids[n]:  # do not split a run
            n -= 1
        return n


def _markers(media: Sequence[Any]) -> list[str]:
    """The prompt markers of `(kind, item)` pairs; ValueError naming the first malformed pair."""
    for i, entry in enumerate(media):
        if not (isinstance(entry, tuple) and len(entry) == 2 and entry[0] in KINDS):
            shown = repr(entry) if len(repr(entry)) <= 80 else repr(entry)[:80] + "..."
            raise ValueError(f"media[{i}] must be an ('image', item) or ('video', item) pair, got {shown}")
    return [KINDS[kind] for kind, _ in media]


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """`(start position, placeholder)` of every media run in `ids`, in order."""
    return [(i, t) for i, t in enumerate(ids) if t < 0 and (i == 0 or ids[i - 1] != t)]
