"""Progress bars over bytes with an item count (tqdm on stderr; silent when disabled)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class _Bar:
    def __init__(self, total_bytes: int, desc: str, total_items: int, enabled: bool):
        self.items, self.total_items = 0, total_items
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_bytes,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def advance(self, nbytes: int, items: int = 1) -> None:
        self.items += items
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(
                f"{self.items}/{self.total_items} tensors", refresh=self.items == self.total_items
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def progress_bar(total_bytes: int, desc: str, total_items: int, *, enabled: bool = True) -> Iterator[_Bar]:
    """A bar advanced by `bar.advance(nbytes)` once per tensor."""
    bar = _Bar(total_bytes, desc, total_items, enabled)
    try:
        yield bar
    finally:
        bar.close()
