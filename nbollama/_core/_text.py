"""A request's text as it is sampled: token bytes in, text that is safe to show out.

Two things make a streamed delta unsafe: a multi-byte UTF-8 character split
across tokens (decoded incrementally, never broken), and the start of a stop
string (held back until it is clearly not one, so a stop never leaks into the
stream). This module knows nothing of models or threads; it is tested alone.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["TextStream", "find_stop", "held_back"]


def find_stop(text: str, stops: Sequence[str], start: int) -> int:
    """The index of the earliest stop string in ``text[start:]``, or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that might be the start of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


class TextStream:
    """Incremental UTF-8 decoding with stop strings; ``feed`` returns what may be shown now."""

    __slots__ = ("stops", "text", "emitted", "stopped", "_decoder", "_longest_stop")

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(stops)
        self.text = ""  # everything decoded so far (cut at a stop string once one is hit)
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._longest_stop = max((len(s) for s in self.stops), default=0)

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; the new text that is safe to show (may be empty).

        After a stop string appears, ``stopped`` is True, ``text`` ends just
        before it, and the delta is whatever preceded it that was held back.
        """
        if self.stopped:
            return ""
        before = len(self.text)
        self.text += self._decoder.decode(piece)
        safe = len(self.text)
        if self._longest_stop:
            hit = find_stop(self.text, self.stops, max(0, before - self._longest_stop))
            if hit >= 0:
                self.text = self.text[:hit]
                self.stopped = True
                return self._take(len(self.text))
            safe -= held_back(self.text, self.stops)
        return self._take(safe)

    def finish(self) -> str:
        """The rest of the text, at the end of the request (a cut-off multi-byte character is dropped)."""
        if not self.stopped:
            self._decoder.errors = "ignore"
            self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
