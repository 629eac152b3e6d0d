"""Shared pieces of the source readers: the skip outcome, image checks, JSON loading, example assembly.

A reader never raises for a bad item: it yields a `Skip` naming the item and a short reason, and the
prepare step counts those. It raises `SourceError` only when a whole input is unusable (a missing input
file, a JSON file that does not parse, a CSV without the needed columns), since nothing of it can be kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence

from owl_jax.data import images
from owl_jax.data.prompts import IMAGE_MARKER
from owl_jax.data.records import Example, RecordError

# Above this many pixels an image is treated as a decompression bomb; PIL's own default threshold.
MAX_IMAGE_PIXELS = images.ImageBudget().max_pixels
# Image files larger than this are refused before being read into memory.
MAX_IMAGE_BYTES = 64 * 1024 * 1024


class SourceError(ValueError):
    """A whole input cannot be read (as opposed to one bad item, which is skipped)."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """One input item that was left out.

    Attributes:
      reason: a short category used for counting, e.g. "missing_image" or "non_alternating".
      item: where the item is, e.g. "data.jsonl:12", "llava.json[3]" or "shard.tar:000000001".
      detail: a human-readable explanation.
    """

    reason: str
    item: str
    detail: str = ""


Outcome = Example | Skip


class ImageProblem(Exception):
    """Why an image cannot be used; turned into a `Skip` by the reader."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def check_image_bytes(data: bytes, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Check that `data` is an image the training pipeline will decode, without decoding its pixels.

    The rule is `owl_jax.data.images.check_image`'s, the one the pipeline, the processor and the server
    follow, so an image accepted here cannot fail for its size later.

    Raises:
      ImageProblem: "corrupt_image" when PIL cannot identify or verify it, "image_too_large" when its
        header claims more than `max_pixels` pixels or more decode memory than the budget allows.
    """
    try:
        images.check_image(data, images.ImageBudget(max_pixels=max_pixels), name=what)
    except images.ImageError as e:
        raise ImageProblem("image_too_large" if e.reason == "too_large" else "corrupt_image", str(e)) from None


def read_image_file(path: str) -> bytes:
    """The raw bytes of an image file, checked with `check_image_bytes`.

    Raises:
      ImageProblem: "missing_image", "unreadable_image", "image_too_large" or "corrupt_image".
    """
    try:
        size = os.path.getsize(path)
        if size > MAX_IMAGE_BYTES:
            raise ImageProblem("image_too_large", f"{path}: {size} bytes exceeds the {MAX_IMAGE_BYTES}-byte limit")
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageProblem("missing_image", f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageProblem("missing_image", f"{path}: is a folder, not an image file") from None
    except OSError as e:
        raise ImageProblem("unreadable_image", f"{path}: {e.strerror or e}") from None
    check_image_bytes(data, path)
    return data


def resolve_image(name: object, image_root: str | None, input_path: str) -> str:
    """Where the image `name` of an item in `input_path` lives.

    Relative names are taken from `image_root`, or from the input file's folder when no root is given
    (so a dataset folder holding both the annotations and the images works without flags).
    """
    if not isinstance(name, str) or not name.strip():
        raise ImageProblem("malformed_item", f"image name {name!r} is not a non-empty string")
    if os.path.isabs(name):
        return name
    return os.path.join(image_root if image_root is not None else os.path.dirname(input_path), name)


def load_images(names: Sequence[object], item: str, *, image_root: str | None, input_path: str) -> list[bytes] | Skip:
    """Read and check every image of one item; the first problem skips the whole item."""
    images = []
    for name in names:
        try:
            images.append(read_image_file(resolve_image(name, image_root, input_path)))
        except ImageProblem as p:
            return Skip(p.reason, item, p.detail)
    return images


def clean_turns(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Strip surrounding whitespace; the template adds its own separators when a prompt is built."""
    return [(q.strip(), a.strip()) for q, a in turns]


def turn_problem(turns: Sequence[tuple[str, str]], item: str) -> Skip | None:
    """Why a conversation is unusable, checked before any image is read (cheap checks first)."""
    if not turns:
        return Skip("empty_conversation", item, "no (human, ai) turn")
    for i, (q, a) in enumerate(turns):
        if not a:
            return Skip("empty_answer", item, f"turn {i} has an empty answer")
        # A marker in the text would make the processor expect an image with no pixels behind it.
        if IMAGE_MARKER in q or IMAGE_MARKER in a:
            return Skip("image_marker_in_text", item, f"turn {i} contains {IMAGE_MARKER!r} in its text")
    return None


def build(turns: list[tuple[str, str]], images: list[bytes], task: str, *, id: str, source: str, item: str) -> Outcome:
    """The validated `Example`, or a `Skip` carrying `Example.validate`'s complaint."""
    try:
        return Example(turns=turns, images=images, task=task, id=id, source=source).validate()
    except RecordError as e:
        return Skip("invalid_example", item, str(e))


def guarded(item: str, convert: Callable[[], Iterator[Outcome]]) -> Iterator[Outcome]:
    """Run one item's conversion, turning an unexpected shape of the data (a number where text belongs,
    a missing key) into a skip rather than a crash of a run that may be hours long."""
    try:
        yield from convert()
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        if isinstance(e, SourceError):
            raise
        yield Skip("malformed_item", item, f"{type(e).__name__}: {e}")


def require_file(path: str) -> None:
    """Fail early, naming the path, when an input file does not exist."""
    if not os.path.isfile(path):
        raise SourceError(f"input {path} does not exist or is not a file")


def iter_jsonl(path: str) -> Iterator[tuple[str, int, object]]:
    """`(item, line_number, value)` for each non-blank line; a line that is not JSON gives a `Skip` value."""
    require_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            item = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                yield item, lineno, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield item, lineno, Skip("malformed_json", item, f"{type(e).__name__}: {e}")


def load_json_list(path: str) -> list:
    """A JSON file holding a list of items (the LLaVA, Alpaca and ShareGPT releases)."""
    require_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of items, found a {type(data).__name__}")
    return data


def text_list(value: object) -> list[str] | None:
    """A caption field as a list of strings: one string, or a list of them (datasets with several
    captions per image); None when the value is neither."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, bytes)) for v in value):
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in value]
    return None
