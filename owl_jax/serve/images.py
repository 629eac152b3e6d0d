"""Image URLs from chat messages → RGB PIL images, with the checks a server exposed to clients needs.

`data:` URLs (base64) are always accepted. Local files (`file://` URLs or plain paths) only when the server
was started with `--allow-local-files`: otherwise any client could make the server read its files. http(s)
URLs only from the hosts the server was started with (`--allow-url-host`, fetched by `owl_jax.serve.fetch`);
without any, network URLs are refused and the server fetches nothing. Video URLs follow the same rules
(`media_source`).

Decoding follows `owl_jax.data.images`: the header is checked before any pixel is decoded, so a small
file that claims a huge canvas (a decompression bomb) costs nothing, large images are shrunk while they
decode, and concurrent decodes share one memory budget. Only regular files are read (a FIFO or a device
named by a client is refused, not waited on).
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from collections.abc import Callable
from typing import Any

from PIL import Image

from owl_jax.data import images
from owl_jax.serve.errors import ApiError

# What a data URL of each medium looks like, for error messages.
_EXAMPLES = {
    "image": ("image/png", "an image (image/png, image/jpeg, ...)"),
    "video": ("video/mp4", "a video (video/mp4, ...)"),
}


def _bad(message: str, media: str = "image") -> ApiError:
    return ApiError(400, message, code=f"invalid_{media}")


def decode_data_url(url: str, name: str = "image", media: str = "image") -> bytes:
    """The bytes of a `data:[<mime>][;...];base64,<payload>` URL (ApiError 400 when malformed).

    `media` ("image" or "video") is the media type the URL must declare, when it declares one.
    """
    example, what = _EXAMPLES[media]
    header, sep, payload = url.partition(",")
    if not sep:
        raise _bad(f"{name}: malformed data URL: no ',' between its header and its payload", media)
    params = header[len("data:") :].split(";")
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise _bad(f"{name}: data URLs must be base64-encoded (data:{example};base64,...)", media)
    mime = params[0].strip().lower()
    if mime and not mime.startswith(f"{media}/"):
        raise _bad(f"{name}: data URL has media type {mime!r}; send {what}", media)
    # Clients wrap long base64 lines or percent-encode the padding; both are harmless to undo.
    payload = "".join(urllib.parse.unquote(payload).split())
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(f"{name}: malformed data URL: its payload is not valid base64 ({e})", media) from None


def local_path(url: str, name: str = "image", media: str = "image") -> str:
    """The filesystem path of a `file://` URL or a plain path."""
    if url.lower().startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise _bad(
                f"{name}: file URL {url[:100]!r} names host {parsed.netloc!r}; only local files can be read", media
            )
        return urllib.parse.unquote(parsed.path)
    return url


def open_image(source: bytes | str, max_pixels: int, name: str = "image") -> Image.Image:
    """Decode `source` (encoded bytes, or a file path) into an RGB image, within the decode budget.

    Raises ApiError 413 when the header says the image is too large to decode (more than `max_pixels`
    pixels, or more memory than one decode may use; checked before decoding), 400 when it cannot be
    read or decoded. Concurrent requests share the process's decode memory budget
    (`owl_jax.data.images`), so simultaneous large images wait for each other.
    """
    try:
        return images.decode_image(source, images.ImageBudget(max_pixels=max_pixels), name=name)
    except images.ImageError as e:
        if e.reason == "too_large":
            raise ApiError(413, str(e), code="image_too_large") from None
        raise _bad(str(e)) from None


# Fetches an http(s) URL: `(url, name, media) -> bytes`, ApiError when refused (owl_jax.serve.fetch.UrlFetcher).
Fetch = Callable[[str, str, str], bytes]


def media_source(
    url: Any, *, allow_local_files: bool, name: str = "image", media: str = "image", fetch: Fetch | None = None
) -> bytes | str:
    """What a media URL from a chat message points at: the bytes of a data URL or of a fetched http(s) URL,
    or a local file's path.

    ApiError 400 for anything else: network URLs (unless `fetch` is given: it decides which it fetches),
    unknown schemes, and local files unless `allow_local_files`. `media` ("image" or "video") names the
    field and the data URL's media type.
    """
    example = _EXAMPLES[media][0].split("/")[0]
    if not isinstance(url, str) or not url:
        raise _bad(f"{name}: {media}_url must be a non-empty string", media)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, name, media)
    if scheme in ("http", "https") and fetch is not None:
        return fetch(url, name, media)
    if scheme in ("http", "https", "ftp"):
        raise _bad(
            f"{name}: this server does not fetch {scheme} URLs; send the {media} inline as a "
            f"data:{example}/...;base64 URL",
            media,
        )
    # Windows drive letters ("C:\...") look like a one-letter scheme; anything else unknown is refused.
    if scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt"):
        raise _bad(f"{name}: unsupported URL scheme {scheme!r}; send a data:{example}/...;base64 URL", media)
    if not allow_local_files:
        raise _bad(
            f"{name}: reading local files is disabled; send the {media} as a data: URL or start the server "
            "with --allow-local-files",
            media,
        )
    return local_path(url, name, media)


def load_image_url(
    url: str, *, allow_local_files: bool, max_pixels: int, name: str = "image", fetch: Fetch | None = None
) -> Image.Image:
    """An `image_url` from a chat message → RGB PIL image (ApiError for refused or unreadable images)."""
    source = media_source(url, allow_local_files=allow_local_files, name=name, fetch=fetch)
    return open_image(source, max_pixels, name)
