"""Decoding images within a memory budget: one rule for the server, the processor, `prepare` and training.

An image file's header gives its size and pixel format before any pixel is decoded. `plan_decode` turns
that header into a decision, and every place that reads images follows it:

- **Refuse** images with more than `max_pixels` pixels (decompression bombs), and images whose decoding
  would need more than `decode_bytes` of memory. A small file can claim a huge canvas: a 9400×9400 PNG
  of 86 KB decodes to 350 MB, and an 80,000,000×1 PNG needs line buffers of about a gigabyte.
- **Working size.** Images whose sides are at most `working_side` decode exactly as they are, so the
  model's resize sees what the released preprocessing sees. Larger ones are shrunk by one integer factor
  on both axes while decoding: JPEG decodes at 1/2, 1/4 or 1/8 scale directly (its DCT allows it), other
  formats decode at full size in their own pixel format and are then converted to RGB and box-reduced
  strip by strip, so no full-size RGB copy is ever made.
- **Concurrency.** Decodes reserve their estimated memory from a `DecodeLimiter` first, so simultaneous
  large images wait for each other instead of adding up; small images barely wait at all.

Every failure is an `ImageError` whose `reason` is "missing", "unreadable", "corrupt" or "too_large",
and whose message names the image.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import io
import math
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator

from PIL import Image

# Bytes per pixel of PIL's in-memory storage, by mode (PIL keeps 3-band images in 4 bytes per pixel).
_ONE_BYTE = frozenset({"1", "L", "P"})
_TWO_BYTES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# The largest raw pixel a decoder may buffer a line of: 16-bit RGBA.
_RAW_LINE_BYTES_PER_PIXEL = 8


@dataclasses.dataclass(frozen=True)
class ImageBudget:
    """The limits every image decode follows.

    Attributes:
      max_pixels: images whose header claims more pixels are refused before decoding (PIL's own
        decompression-bomb threshold by default).
      working_side: images with a side longer than this are shrunk while decoding, by one integer factor on
        both axes, to at most this many pixels a side; smaller images decode exactly.
      decode_bytes: the memory one decode may use, estimated from the header; images that would need more
        are refused. It is also the capacity of the default `DecodeLimiter` shared by concurrent decodes.
    """

    max_pixels: int = 89_478_485
    working_side: int = 4096
    decode_bytes: int = 512 * 1024 * 1024

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImageBudget.{field.name} must be a positive integer, got {value!r}")


class ImageError(ValueError):
    """An image that cannot be used. `reason`: "missing", "unreadable", "corrupt" or "too_large"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How one image is decoded (see `plan_decode`).

    Attributes:
      size: (width, height) in the header.
      mode: PIL's mode of the decoded pixels.
      draft: the JPEG scale denominator (1, 2, 4 or 8) it decodes at; 1 for every other format.
      reduce: the integer box-reduction factor applied after decoding; 1 for none.
      working_size: (width, height) of the RGB image handed on.
      memory: bytes the decode is estimated to need at its peak.
    """

    size: tuple[int, int]
    mode: str
    draft: int
    reduce: int
    working_size: tuple[int, int]
    memory: int


def _bytes_per_pixel(mode: str) -> int:
    return 1 if mode in _ONE_BYTE else 2 if mode in _TWO_BYTES else 4


def _shrink(width: int, height: int, factor: int) -> tuple[int, int]:
    return -(-width // min(factor, width)), -(-height // min(factor, height))


def plan_decode(image: Image.Image, budget: ImageBudget, name: str = "image") -> DecodePlan:
    """The decode plan for an opened, not yet decoded image; ImageError("too_large") if it is refused.

    For a JPEG larger than the working size this also sets up its scaled decoding (`Image.draft`).
    """
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("corrupt", f"{name}: the header gives an empty size {width}x{height}")
    if width * height > budget.max_pixels:
        raise ImageError(
            "too_large",
            f"{name} is {width}x{height} = {width * height} pixels, more than max_image_pixels={budget.max_pixels}",
        )
    side = budget.working_side
    if image.format == "JPEG" and max(width, height) > side:
        scale = next((s for s in (2, 4) if max(width, height) <= side * s), 8)
        image.draft(image.mode, (max(1, width // scale), max(1, height // scale)))
    decoded, mode = image.size, image.mode
    draft = round(width / decoded[0])
    reduce = max(1, math.ceil(max(decoded) / side))
    working = _shrink(*decoded, reduce)
    native = decoded[0] * decoded[1] * _bytes_per_pixel(mode)
    lines = 2 * decoded[0] * _RAW_LINE_BYTES_PER_PIXEL + decoded[1] * 8  # a decoder's line buffers, PIL's row table
    if reduce == 1:  # the RGB conversion copies the whole image
        extra = decoded[0] * decoded[1] * 4
    else:  # one strip in its own mode and in RGB, and the reduced image
        extra = _strip_rows(decoded[1], reduce) * decoded[0] * 8 + working[0] * working[1] * 4
    memory = native + lines + extra
    if memory > budget.decode_bytes:
        raise ImageError(
            "too_large",
            f"{name} ({width}x{height} {mode}) would need about {memory >> 20} MiB to decode, more than the "
            f"limit of {budget.decode_bytes >> 20} MiB",
        )
    return DecodePlan((width, height), mode, draft, reduce, working, memory)


class DecodeLimiter:
    """A memory budget shared by concurrent decodes: each reserves its plan's estimate until it is done."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 1:
            raise ValueError(f"DecodeLimiter capacity must be positive, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self._free = capacity_bytes
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` (at most the capacity) of the budget for the duration of the block."""
        nbytes = min(nbytes, self.capacity)
        with self._changed:
            self._changed.wait_for(lambda: self._free >= nbytes)
            self._free -= nbytes
        try:
            yield
        finally:
            with self._changed:
                self._free += nbytes
                self._changed.notify_all()


_SHARED_LIMITERS: dict[int, DecodeLimiter] = {}
_SHARED_LOCK = threading.Lock()


def shared_limiter(capacity_bytes: int) -> DecodeLimiter:
    """The process-wide limiter of this capacity (what decodes without an explicit limiter share)."""
    with _SHARED_LOCK:
        return _SHARED_LIMITERS.setdefault(capacity_bytes, DecodeLimiter(capacity_bytes))


# Decodes estimated above this hand their freed memory back to the operating system when they finish.
_TRIM_ABOVE = 32 * 1024 * 1024


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Give memory freed by a large decode back to the operating system.

    glibc keeps freed heap memory in the arena of the thread that used it, and PIL allocates images in
    blocks that land there, so every server thread that once decoded a large image would keep hundreds
    of megabytes resident. `malloc_trim` returns it; where the C library has none this does nothing.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _open_file(path: str, name: str) -> io.BufferedReader:
    """Open a regular file for reading without blocking on FIFOs or devices (ImageError otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError("missing", f"{name}: no such file {path!r}") from None
    except IsADirectoryError:  # on platforms where opening a folder fails (elsewhere fstat below refuses it)
        raise ImageError("unreadable", f"{name}: {path!r} is a folder, not an image file") from None
    except OSError as e:
        raise ImageError("unreadable", f"{name}: cannot open {path!r}: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise ImageError("unreadable", f"{name}: {path!r} is {kind}, not an image file")
    return os.fdopen(fd, "rb")


@contextlib.contextmanager
def _opened(source: bytes | str | os.PathLike, max_pixels: int, name: str) -> Iterator[Image.Image]:
    """`Image.open` of encoded bytes or a file (header only), with PIL's errors turned into ImageError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageError("corrupt", f"{name}: empty image data")
        stream = io.BytesIO(source)
    else:
        stream = _open_file(os.fspath(source), name)
    with stream:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(stream)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(
                "too_large", f"{name} is too large, more than max_image_pixels={max_pixels}: {e}"
            ) from None
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error...)
            raise ImageError("corrupt", f"{name}: not a readable image ({type(e).__name__}: {e})") from None
        with image:
            yield image


def check_image(
    source: bytes | str | os.PathLike, budget: ImageBudget = ImageBudget(), name: str = "image"
) -> DecodePlan:
    """Check that `source` is an image `decode_image` will accept, without decoding its pixels.

    Reads the header, applies `plan_decode`, and lets PIL verify the file's structure (checksums and
    chunk layout where the format has them). Raises ImageError; returns the plan.
    """
    with _opened(source, budget.max_pixels, name) as image:
        plan = plan_decode(image, budget, name)
        try:
            image.verify()
        except Exception as e:
            raise ImageError("corrupt", f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return plan


def _strip_rows(height: int, factor: int) -> int:
    """Rows per strip when reducing by `factor`: whole boxes, about 64 rows."""
    fy = min(factor, height)
    return min(height, fy * max(1, 64 // fy))


def _reduce_in_strips(image: Image.Image, factor: int) -> Image.Image:
    """`image.convert("RGB").reduce(factor)` without a full-size RGB copy (the same pixels)."""
    width, height = image.size
    fx, fy = min(factor, width), min(factor, height)
    out = Image.new("RGB", _shrink(width, height, factor))
    rows = _strip_rows(height, factor)
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(top + rows, height))).convert("RGB")
        out.paste(strip.reduce((fx, fy)), (0, top // fy))
    return out


def decode_image(
    source: bytes | str | os.PathLike,
    budget: ImageBudget = ImageBudget(),
    *,
    limiter: DecodeLimiter | None = None,
    name: str = "image",
) -> Image.Image:
    """Decode encoded bytes or an image file into an RGB PIL image of at most `budget.working_side` a side.

    Images within the working size come back exactly as `Image.open(...).convert("RGB")` gives them.
    The decode holds its estimated memory in `limiter` (the process-wide one for `budget.decode_bytes`
    by default) while it runs. Raises ImageError naming `name`.
    """
    limiter = limiter or shared_limiter(budget.decode_bytes)
    with _opened(source, budget.max_pixels, name) as image:
        plan = plan_decode(image, budget, name)
        with limiter.reserve(plan.memory):
            try:
                try:
                    image.load()
                    return image.convert("RGB") if plan.reduce == 1 else _reduce_in_strips(image, plan.reduce)
                finally:
                    image.close()  # the full-size pixels go now, while the reservation still counts them
                    if plan.memory >= _TRIM_ABOVE:
                        _return_freed_memory()
            except MemoryError:
                raise ImageError("too_large", f"{name}: out of memory while decoding {plan.size}") from None
            except Exception as e:  # truncated or corrupt pixel data
                raise ImageError("corrupt", f"{name}: cannot decode ({type(e).__name__}: {e})") from None
