"""``%nbollama cache``: what the result store holds, clearing it, moving it."""

from __future__ import annotations

import html

from ..memory import format_bytes
from ..store import StoreStats, clear, stats, use_directory
from ._parse_nbollama import CacheCall

__all__ = ["CacheReport", "run_cache"]

_CELL = 'style="text-align:left;padding:1px 10px 1px 0"'


class CacheReport:
    """The store's figures: plain text in a terminal, a small table in a notebook."""

    def __init__(self, figures: StoreStats, done: str = "") -> None:
        self.stats = figures
        self.done = done  # what the command did ("removed 12 entries"), if anything

    def _lines(self) -> list[tuple[str, str]]:
        s = self.stats
        state = "on" if s.enabled else f"off: {s.problem}"
        rows = [
            ("store", f"{s.path} ({state})"),
            ("size", f"{format_bytes(s.bytes)} of results ({format_bytes(s.file_bytes)} on disk), "
                     f"bound {format_bytes(s.max_bytes)} (NBOLLAMA_CACHE_MAX)"),
            ("entries", f"{s.entries:,}"),
            ("this kernel", f"{s.hits:,} of {s.lookups:,} lookups replayed ({s.hit_rate:.0%})"),
        ]
        rows += [(f"  {model}", f"{count:,} entries") for model, count in s.by_model.items()]
        return rows

    def __repr__(self) -> str:
        head = [f"nbollama: {self.done}"] if self.done else []
        return "\n".join(head + [f"{k}: {v}" for k, v in self._lines()])

    def _repr_html_(self) -> str:
        head = f"<div><b>{html.escape(self.done)}</b></div>" if self.done else ""
        rows = "".join(
            f"<tr><td {_CELL}>{html.escape(k)}</td><td {_CELL}>{html.escape(v)}</td></tr>" for k, v in self._lines()
        )
        return f'{head}<table class="nbollama-cache">{rows}</table>'


def run_cache(call: CacheCall) -> CacheReport:
    done = []
    if call.directory is not None:
        store = use_directory(call.directory)
        done.append(f"results are kept in {store.path} from now on")
    if call.clear:
        removed = clear(model=call.model, older_than=call.older_than)
        which = f" of {call.model!r}" if call.model else ""
        age = f" unused for {call.older_than / 86400:g} days" if call.older_than else ""
        done.append(f"removed {removed:,} entr{'y' if removed == 1 else 'ies'}{which}{age}")
    return CacheReport(stats(), "; ".join(done))
