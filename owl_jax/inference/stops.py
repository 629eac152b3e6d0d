"""Stop strings: a row's generation ends once its decoded text contains one, and its text is cut before it.

One implementation for every caller: the generator finds the token at which a row's text first contains a
stop string (`StopScanner`) and ends the row there; whoever turns the ids into text cuts it before the stop
string (`cut_at_stop`) and, while streaming, holds back the end of the text that may still become one
(`visible_text`), so a streamed answer never shows a stop string or the start of one that completes later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins (the earliest of them all), or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) its first stop string; all of it when it holds none."""
    at = find_stop(text, stops)
    return text if at is None else text[:at]


def visible_text(text: str, stops: Sequence[str]) -> str:
    """What of a growing text can be shown: up to its first stop string, or, while it holds none, all but its
    longest ending that begins a stop string (more text may complete it)."""
    at = find_stop(text, stops)
    if at is not None:
        return text[:at]
    held = 0
    for stop in stops:
        for start in range(max(0, len(text) - len(stop) + 1), len(text)):  # longest ending first
            if stop.startswith(text[start:]):
                held = max(held, len(text) - start)
                break
    return text[: len(text) - held]


def stop_scanner(stops: Sequence[str], decode: Callable[[list[int]], str] | None) -> StopScanner | None:
    """A `StopScanner` for `stops` (None when there are none); ValueError when there are but no `decode`."""
    if not stops:
        return None
    if decode is None:
        raise ValueError("config.stop needs decode= (the processor's decode) to read the generated text")
    return StopScanner(stops, decode)


class StopScanner:
    """Finds where generated ids first decode to text holding a stop string.

    Args:
      stops: the stop strings.
      decode: ids → text (the tokenizer's decode).
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[list[int]], str]):
        self.stops, self.decode = tuple(stops), decode

    def first_stop(self, tokens: Sequence[int], new: int) -> int | None:
        """The length of the shortest prefix of `tokens` whose text holds a stop string, looking only at the
        prefixes that end in the last `new` tokens (the earlier ones were scanned before); None if none does.

        The whole text is decoded once; only when it holds a stop string are the new prefixes decoded one by
        one to find the token that completed it.
        """
        tokens = [int(t) for t in tokens]
        if not self.stops or new <= 0 or find_stop(self.decode(tokens), self.stops) is None:
            return None
        for n in range(max(1, len(tokens) - new + 1), len(tokens)):
            if find_stop(self.decode(tokens[:n]), self.stops) is not None:
                return n
        return len(tokens)

    def scan_block(
        self, previous: np.ndarray, block: np.ndarray, finished: np.ndarray, eos_token_id: int
    ) -> np.ndarray:
        """`(B,)`: for each row not `finished`, the column of `block` `(B, n)` (the tokens after `previous`
        `(B, s)`) whose token completes a stop string in the row's text, else -1. A row that reaches EOS in
        the block is scanned up to it."""
        ends = np.full(len(block), -1)
        for row in np.flatnonzero(~np.asarray(finished)):
            new = [int(t) for t in block[row]]
            if eos_token_id in new:
                new = new[: new.index(eos_token_id)]
            n = self.first_stop(previous[row].tolist() + new, len(new))
            if n is not None:
                ends[row] = n - 1 - previous.shape[1]
        return ends
