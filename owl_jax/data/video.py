"""Reading the frames of a video as the released mPLUG-Owl video package does.

The release samples T frames with `frame_indices` (its `get_index`) and reads them with decord at a fixed
224×224 (decord decodes and squashes each frame with its own scaler, whatever the model's image size).
decord reproduces the released frames exactly; without decord, PyAV decodes the file sequentially instead
(close to, but not exactly, the same pixels; see `read_frames`). Install either with `owl_jax[video]`.

A video with fewer frames than asked for behaves as in the release: `frame_indices` repeats indices
(3 frames, T = 4 → [0, 0, 1, 2]) and the repeated frames are read twice. T = 1 is refused (`MIN_FRAMES`):
the video model's temporal layers need several frames, and the release crashes on one.

Frames larger than `MAX_FRAME_PIXELS` (8K UHD fits) are refused from the stream's header before any frame
is decoded (checked with PyAV when it is installed): a decoder holds several full-size frames at once.

Every failure is a `VideoError` whose `reason` is "missing", "unreadable", "empty", "too_large" or
"backend", and whose message (one line) names the file.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence

import numpy as np

DECODE_SIZE = 224  # the side decord squashes frames to in the release
MIN_FRAMES = 2
MAX_FRAME_PIXELS = 2 * 4096 * 4096  # per decoded frame, before the squash to 224×224
BACKENDS = ("auto", "decord", "pyav")


class VideoError(ValueError):
    """A video that cannot be used. `reason`: "missing", "unreadable", "empty", "too_large" or "backend"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def frame_indices(total: int, num_frames: int) -> np.ndarray:
    """The released `get_index`: which of `total` frames to read, (num_frames,) int64, in order.

    `seg = (total - 1) / num_frames` (float64); index k is `int(seg / 2) + round(seg · k)` with numpy's
    round-half-even: (23, 4) → [2, 8, 13, 18], (37, 4) → [4, 13, 22, 31], (10, 4) → [1, 3, 5, 8].
    Every index lies in [0, total - 1]; fewer frames than `num_frames` repeat some ((3, 4) → [0, 0, 1, 2]).
    """
    if total < 1:
        raise ValueError(f"a video needs at least one frame to sample from, got total={total}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    seg = float(total - 1) / num_frames
    start = int(seg / 2)
    return np.asarray([start + int(np.round(seg * k)) for k in range(num_frames)], np.int64)


def decord_available() -> bool:
    """Whether decord (the released reader) can be imported."""
    try:
        return importlib.util.find_spec("decord") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken package
        return False


def _pyav_available() -> bool:
    try:
        return importlib.util.find_spec("av") is not None
    except (ImportError, ValueError):
        return False


def _one_line(error: BaseException) -> str:
    """A library error as one short line (decord's start with a timestamp and a source location)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0]) if lines else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def _check_file(path: str, name: str) -> None:
    if not os.path.exists(path):
        raise VideoError("missing", f"{name}: no such file {path!r}")
    if not os.path.isfile(path):
        raise VideoError("unreadable", f"{name}: {path!r} is not a regular file")


def _check_frame_size(path: str, name: str, max_pixels: int) -> None:
    """Refuse a video whose frames the header says are larger than `max_pixels` (needs PyAV; a file PyAV
    cannot open is left to the reader, whose error says why)."""
    if not _pyav_available():
        return
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                return
            context = container.streams.video[0].codec_context
            width, height = int(context.width or 0), int(context.height or 0)
    except Exception:
        return
    if width * height > max_pixels:
        raise VideoError(
            "too_large", f"{name}: its frames are {width}×{height} pixels, more than the limit of {max_pixels}"
        )


def check_num_frames(num_frames: int, name: str) -> None:
    """ValueError naming `name` unless `num_frames` is an integer of at least `MIN_FRAMES`."""
    if not isinstance(num_frames, (int, np.integer)) or num_frames < MIN_FRAMES:
        raise ValueError(
            f"{name}: num_frames must be an integer of at least {MIN_FRAMES} (the video model mixes frames over "
            f"time), got {num_frames!r}"
        )


# ----------------------------------------------------------------------------------------------- decord
def _read_decord(path: str, num_frames: int, name: str) -> np.ndarray:
    import decord

    try:
        reader = decord.VideoReader(path, height=DECODE_SIZE, width=DECODE_SIZE)
    except Exception as e:  # decord raises RuntimeError or DECORDError, with multi-line messages
        raise _diagnose(path, name, e) from None
    try:
        total = len(reader)
        if total < 1:
            raise VideoError("empty", f"{name} has no frames")
        frames = []
        for index in frame_indices(total, num_frames):
            frame = reader[int(index)]  # one index at a time, as the release reads them
            frames.append(np.asarray(frame.asnumpy() if hasattr(frame, "asnumpy") else frame))
    except VideoError:
        raise
    except Exception as e:
        raise VideoError("unreadable", f"{name}: cannot decode its frames ({_one_line(e)})") from None
    finally:
        del reader
    return np.stack(frames).astype(np.uint8, copy=False)


def _diagnose(path: str, name: str, error: BaseException) -> VideoError:
    """Why decord could not open `path`: PyAV (when installed) tells an empty video from a broken file."""
    if _pyav_available():
        import av

        try:
            with av.open(path) as container:
                if not container.streams.video:
                    return VideoError("empty", f"{name} has no video stream")
                if _count_frames(container) == 0:
                    return VideoError("empty", f"{name} has no frames")
        except Exception:
            pass
    return VideoError("unreadable", f"{name}: not a readable video ({_one_line(error)})")


# ------------------------------------------------------------------------------------------------- PyAV
def _count_frames(container) -> int:
    stream = container.streams.video[0]
    return sum(1 for _ in container.decode(stream))


def _pick_pyav(path: str, indices: np.ndarray) -> tuple[dict[int, np.ndarray], int]:
    """Decode `path` from the start until the last wanted index; the wanted frames at 224×224 and the count."""
    import av

    wanted, last = set(indices.tolist()), int(indices.max())
    picked: dict[int, np.ndarray] = {}
    seen = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if seen in wanted:
                scaled = frame.reformat(width=DECODE_SIZE, height=DECODE_SIZE, format="rgb24", interpolation="BILINEAR")
                picked[seen] = scaled.to_ndarray()
            seen += 1
            if seen > last:
                break
    return picked, seen


def _read_pyav(path: str, num_frames: int, name: str) -> np.ndarray:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError("empty", f"{name} has no video stream")
            # The container's frame count when it has one (decord's count too), else a counting pass.
            total = container.streams.video[0].frames or _count_frames(container)
        if total < 1:
            raise VideoError("empty", f"{name} has no frames")
        indices = frame_indices(total, num_frames)
        picked, seen = _pick_pyav(path, indices)
        if seen <= int(indices.max()):  # the header claimed more frames than decode: sample what is there
            if seen < 1:
                raise VideoError("empty", f"{name} has no frames")
            indices = frame_indices(seen, num_frames)
            picked, _ = _pick_pyav(path, indices)
    except VideoError:
        raise
    except Exception as e:  # av.FFmpegError subclasses, OSError, EOFError...
        raise VideoError("unreadable", f"{name}: not a readable video ({_one_line(e)})") from None
    return np.stack([picked[int(i)] for i in indices])


# ---------------------------------------------------------------------------------------------- reading
def read_frames(
    path: str | os.PathLike,
    num_frames: int = 4,
    backend: str = "auto",
    name: str | None = None,
    *,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
) -> np.ndarray:
    """The `num_frames` frames the release samples from a video file: (T, 224, 224, 3) uint8 RGB.

    Args:
      path: a video file (anything FFmpeg reads).
      num_frames: T, at least 2; indices from `frame_indices(total, T)`.
      backend: "decord" (the released reader: `VideoReader(path, height=224, width=224)`, one frame at a
        time; the released frames exactly), "pyav" (a sequential decode, each wanted frame scaled to 224×224
        with FFmpeg's bilinear scaler: about one level away from decord on average, under one on the
        reference clips, and a few tens at sharp edges and in odd-sized videos), or "auto" (decord when
        installed, else PyAV).
      name: how errors call the video (default `video '<path>'`).
      max_frame_pixels: frames larger than this (width × height in the header) are refused.

    Raises:
      VideoError naming the file: missing, unreadable or corrupt, no video stream or no frames, frames
        over `max_frame_pixels`, or no reader installed. ValueError for num_frames below 2.
    """
    path = os.fspath(path)
    name = name or f"video {path!r}"
    check_num_frames(num_frames, name)
    if backend not in BACKENDS:
        raise ValueError(f"video backend {backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        backend = "decord" if decord_available() else "pyav"
    if backend == "decord" and not decord_available():
        raise VideoError("backend", f"{name}: the decord backend was asked for but decord is not installed")
    if backend == "pyav" and not _pyav_available():
        raise VideoError("backend", f"{name}: reading videos needs decord or PyAV (pip install 'owl_jax[video]')")
    _check_file(path, name)
    _check_frame_size(path, name, max_frame_pixels)
    return _read_decord(path, num_frames, name) if backend == "decord" else _read_pyav(path, num_frames, name)


def check_frames(frames: np.ndarray, name: str = "video") -> np.ndarray:
    """Validate already-sampled frames (T, H, W, 3) uint8 with T of at least 2; returns them as an array."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name}: frame arrays must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    check_num_frames(frames.shape[0], name)
    return frames


def stack_videos(per_video: Sequence[np.ndarray], num_frames: int, size: int) -> np.ndarray:
    """Per-video (T, 3, S, S) arrays → (V, 3, T, S, S) float32; (0, 3, T, S, S) for none."""
    if not per_video:
        return np.zeros((0, 3, num_frames, size, size), np.float32)
    lengths = sorted({v.shape[0] for v in per_video})
    if len(lengths) > 1:
        raise ValueError(f"the videos of one batch must have the same number of frames, got {lengths}")
    return np.stack(per_video).transpose(0, 2, 1, 3, 4)
