"""http(s) media URLs, fetched only from the hosts an operator allowed (`--allow-url-host`).

A server that fetched any URL a client names could be made to reach hosts only it can reach (a request
forgery), so network URLs are refused unless their host is on the allow-list, and nothing else is ever
fetched: a redirect to another host (or to another scheme than http/https) is refused, proxies from the
environment are not used, the answer is capped at `max_bytes` (checked against `Content-Length` before
reading, and counted while reading), and the fetch is abandoned once `timeout` seconds have passed
(each read waits at most that long). Every failure is an `ApiError` naming the medium (400; 413 for an
answer over the cap).

An allow-list entry is a host name or address (`images.example.org`, `127.0.0.1`, `[::1]`), which allows
any port, or `host:port`, which allows that port only. Names are compared as written (lower case); they
are not resolved, so allow the name that clients use.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable

from owl_jax.serve.errors import ApiError

MAX_REDIRECTS = 3
CHUNK = 1 << 16


def _host_port(netloc: str) -> tuple[str, int | None]:
    """`(host, port or None)` of `host`, `host:port`, `[v6]` or `[v6]:port` (ValueError when malformed)."""
    parts = urllib.parse.urlsplit(f"//{netloc}")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"no host in {netloc!r}")
    return host, parts.port


def parse_allow_list(entries: Iterable[str]) -> frozenset[tuple[str, int | None]]:
    """The allow-list as `(host, port or None)` pairs; ValueError naming a malformed entry."""
    out = set()
    for entry in entries:
        try:
            out.add(_host_port(entry.strip()))
        except ValueError as e:
            raise ValueError(f"invalid allowed URL host {entry!r}: {e}") from None
    return frozenset(out)


class UrlFetcher:
    """Fetches http(s) URLs of allowed hosts: `fetcher(url, name, media) -> bytes` (ApiError otherwise).

    Args:
      hosts: allow-list entries, `host` or `host:port`.
      timeout: seconds the whole fetch may take.
      max_bytes: the largest answer accepted (the server passes its request body limit).
    """

    def __init__(self, hosts: Iterable[str], *, timeout: float = 10.0, max_bytes: int = 20 * 2**20):
        if not timeout > 0 or max_bytes < 1:
            raise ValueError(f"the URL timeout and size limit must be positive, got {timeout} s and {max_bytes} bytes")
        self.hosts = parse_allow_list(hosts)
        self.timeout, self.max_bytes = float(timeout), int(max_bytes)

    def allows(self, url: str) -> bool:
        """Whether `url` is http(s) on an allowed host (and port)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            return False
        try:
            host, port = _host_port(parts.netloc.rpartition("@")[2])
        except ValueError:
            return False
        port = port or (443 if parts.scheme.lower() == "https" else 80)
        return (host, None) in self.hosts or (host, port) in self.hosts

    def __call__(self, url: str, name: str = "image", media: str = "image") -> bytes:
        if not self.allows(url):
            allowed = ", ".join(sorted(h if p is None else f"{h}:{p}" for h, p in self.hosts)) or "none"
            raise ApiError(
                400,
                f"{name}: this server fetches URLs only from its allowed hosts ({allowed}); send the {media} "
                f"inline as a data:{media}/...;base64 URL",
                code=f"invalid_{media}",
            )
        deadline = time.monotonic() + self.timeout
        redirects = _SameHostRedirects(url, self, name, media)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), redirects)
        try:
            with opener.open(urllib.request.Request(url, headers={"Accept": f"{media}/*"}), timeout=self.timeout) as r:
                return self._read(r, deadline, name, media)
        except ApiError:
            raise
        except urllib.error.HTTPError as e:
            raise self._bad(f"{name}: fetching {url[:200]!r} failed: HTTP {e.code} {e.reason}", media) from None
        except TimeoutError:
            raise self._bad(f"{name}: fetching {url[:200]!r} took more than {self.timeout:g} s", media) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise self._bad(f"{name}: fetching {url[:200]!r} took more than {self.timeout:g} s", media) from None
            raise self._bad(f"{name}: fetching {url[:200]!r} failed: {reason}", media) from None

    def _read(self, response, deadline: float, name: str, media: str) -> bytes:
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            raise self._too_large(name, media, f"{int(length)} bytes")
        data = bytearray()
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = response.read(min(CHUNK, self.max_bytes + 1 - len(data)))
            if not chunk:
                return bytes(data)
            data += chunk
            if len(data) > self.max_bytes:
                raise self._too_large(name, media, f"more than {self.max_bytes} bytes")

    def _too_large(self, name: str, media: str, size: str) -> ApiError:
        return ApiError(
            413,
            f"{name}: the fetched {media} is {size}, more than the server's limit of {self.max_bytes} bytes",
            code=f"{media}_too_large",
        )

    @staticmethod
    def _bad(message: str, media: str) -> ApiError:
        return ApiError(400, message, code=f"invalid_{media}")


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most `MAX_REDIRECTS` redirects, each to an allowed URL on the first URL's host."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, url: str, fetcher: UrlFetcher, name: str, media: str):
        self.host = urllib.parse.urlsplit(url).hostname
        self.fetcher, self.name, self.media = fetcher, name, media

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        if urllib.parse.urlsplit(target).hostname != self.host or not self.fetcher.allows(target):
            raise ApiError(
                400,
                f"{self.name}: fetching {req.full_url[:200]!r} was redirected to {target[:200]!r}; redirects to "
                "other hosts are not followed",
                code=f"invalid_{self.media}",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)
