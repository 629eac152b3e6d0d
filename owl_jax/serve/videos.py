"""Video URLs from chat messages → sampled frames, with the checks a server exposed to clients needs.

The URL rules are the images' (`owl_jax.serve.images.media_source`): `data:` URLs (base64, media type
`video/...` or none) always, local files only with `--allow-local-files`, http(s) URLs only from the
allowed hosts (`--allow-url-host`). The video
readers take files, so a data URL's (or a fetched URL's) bytes are written to a temporary file that is
removed as soon as the frames are read, whether or not reading succeeds; the request body limit bounds
its size.

Frames are read by `owl_jax.data.video.read_frames` (as the released video model samples them). Frames
larger than the server's pixel limit are refused from the stream's header, and the decode holds an
estimate of its memory in the process-wide `DecodeLimiter` that image decodes use, so large videos and
images decoded at the same time wait for each other instead of adding up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from owl_jax.data import images, video
from owl_jax.serve.errors import ApiError
from owl_jax.serve.images import Fetch, media_source

# A decoder holds a few full-size frames (reference frames, threads' work); the estimate allows this many.
DECODER_FRAMES = 16
RGBA_BYTES = 4


def frame_size(path: str) -> tuple[int, int] | None:
    """`(width, height)` of the first video stream's frames from the header (PyAV), or None when unknown."""
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                return None
            context = container.streams.video[0].codec_context
            return int(context.width or 0), int(context.height or 0)
    except Exception:  # not a video PyAV can open: the reader's error says why
        return None


def decode_memory(path: str, capacity: int) -> int:
    """The bytes a video decode reserves: `DECODER_FRAMES` RGBA frames of its size (a quarter of `capacity`
    when the header cannot tell), at most `capacity`."""
    size = frame_size(path)
    if size is None or min(size) < 1:
        return capacity // 4
    width, height = size
    frames = max(width * height, video.DECODE_SIZE**2) * RGBA_BYTES * DECODER_FRAMES
    return min(capacity, frames)


def read_video(path: str, *, num_frames: int, max_frame_pixels: int, backend: str = "auto", name: str) -> np.ndarray:
    """`read_frames` of a file within the shared decode budget → `(T, 224, 224, 3)` uint8.

    ApiError 413 ("video_too_large") for frames over `max_frame_pixels`, 400 ("invalid_video") for missing,
    unreadable, corrupt or empty videos, 500 when no video reader is installed.
    """
    limiter = images.shared_limiter(images.ImageBudget().decode_bytes)
    try:
        with limiter.reserve(decode_memory(path, limiter.capacity)):
            return video.read_frames(path, num_frames, backend, name, max_frame_pixels=max_frame_pixels)
    except video.VideoError as e:
        if e.reason == "too_large":
            raise ApiError(413, str(e), code="video_too_large") from None
        if e.reason == "backend":
            raise ApiError(500, str(e), type="server_error", code="video_reader_missing") from None
        raise ApiError(400, str(e), code="invalid_video") from None


def load_video_url(
    url: str,
    *,
    allow_local_files: bool,
    num_frames: int,
    max_frame_pixels: int,
    backend: str = "auto",
    name: str = "video",
    fetch: Fetch | None = None,
) -> np.ndarray:
    """A `video_url` from a chat message → its sampled frames `(T, 224, 224, 3)` uint8 (ApiError otherwise)."""
    source = media_source(url, allow_local_files=allow_local_files, name=name, media="video", fetch=fetch)
    options = dict(num_frames=num_frames, max_frame_pixels=max_frame_pixels, backend=backend, name=name)
    if isinstance(source, str):
        return read_video(source, **options)
    if not source:
        raise ApiError(400, f"{name}: empty video data", code="invalid_video")
    fd, path = tempfile.mkstemp(prefix="owl-video-", suffix=".video")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(source)
        return read_video(path, **options)
    except ApiError as e:  # a reader's message may quote the file: the client never saw this path
        message = e.message.replace(path, "(the URL's bytes)")
        raise ApiError(e.status, message, type=e.type, code=e.code, param=e.param) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
