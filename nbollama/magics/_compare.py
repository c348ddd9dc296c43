"""``%%generate --models a,b``: every prompt to each engine, shown side by side.

One ``Feeder`` per engine, all polled from the cell's thread (each engine
runs its requests on its own thread, so they go at once); one display, a row
per prompt and a column per engine, refreshed a few times a second. The
results of all engines come back as one ``Results`` whose ``model`` column
says which engine answered; ``Results.compare()`` pivots them back.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.display import DisplayHandle, display

from .._api.feed import Feeder, window_of
from .._palette import badge_html
from ..engine import EngineLike, Handle, Result
from ..exceptions import NbollamaError
from ..results import Results
from ._parse_generate import GenerateCall

__all__ = ["CompareRun", "start_compare"]

#: Rows the live table shows; the rest are in the results (``VAR.compare()``).
ROWS_SHOWN = 20
_REFRESH = 0.25


def start_compare(engines: dict[str, EngineLike], call: GenerateCall) -> CompareRun:
    """Feed the cell's prompts to every engine; an engine's refusal is a UsageError before any display."""
    feeders: dict[str, Feeder] = {}
    try:
        for name, engine in engines.items():
            run = engine.open_store_run(call.prompts, dict(call.params))
            feeder = Feeder(call.prompts, engine.submit_many, call.params, window=window_of(engine), run=run)
            feeders[name] = feeder
            feeder.feed()
    except NbollamaError as exc:
        for started in feeders.values():
            started.cancel()
        raise UsageError(f"{call.prog} --models: {name}: {exc}") from None
    return CompareRun(engines, feeders, live=not call.quiet, index=call.index)


class CompareRun:
    """The engines' feeders and the side-by-side display; everything on the cell's thread."""

    def __init__(
        self,
        engines: dict[str, EngineLike],
        feeders: dict[str, Feeder],
        *,
        live: bool,
        index: Sequence[Any] | None = None,
    ) -> None:
        self.engines = engines
        self.feeders = feeders
        self.live = live
        self.index = index
        self.display: DisplayHandle | None = None

    def _html(self, final: bool) -> str:
        names = list(self.feeders)
        prompts = next(iter(self.feeders.values())).prompts
        head = "".join(
            f'<th style="text-align:left">{html.escape(n)}<br><span style="font-weight:normal;color:#757575">'
            f"{html.escape(self.engines[n].model_name)}, parallel {self.engines[n].parallel}</span></th>"
            for n in names
        )
        items = {n: f.items for n, f in self.feeders.items()}
        rows = []
        for i, prompt in enumerate(prompts[:ROWS_SHOWN]):
            cells = "".join(f'<td style="vertical-align:top;text-align:left">{_cell(items[n][i])}</td>' for n in names)
            rows.append(
                f'<tr><td style="vertical-align:top;text-align:left;color:#424242">{html.escape(_short(prompt))}</td>{cells}</tr>'
            )
        more = len(prompts) - ROWS_SHOWN
        note = f"<p>{more} more prompts: see the results' <code>.compare()</code></p>" if more > 0 else ""
        totals = " · ".join(
            f"{html.escape(n)}: {_throughput(f)}" for n, f in self.feeders.items()
        )
        status = "done" if final else "running"
        return (
            f'<div class="nbollama-compare"><div style="color:#616161">{len(prompts)} prompts x '
            f"{len(names)} engines, {status} · {totals}</div>"
            f'<table class="nbollama-compare-table"><thead><tr><th style="text-align:left">prompt</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>{note}</div>"
        )

    def show(self) -> None:
        if self.live:
            self.display = display({"text/html": self._html(False), "text/plain": "comparing"}, raw=True, display_id=True)

    def pump(self) -> None:
        """Poll every feeder until all finished, refreshing the display every 0.25 s."""
        next_tick = time.monotonic() + _REFRESH
        pending = dict(self.feeders)
        while pending:
            for name, feeder in list(pending.items()):
                if feeder.poll(0.02):
                    del pending[name]
            if self.display is not None and time.monotonic() >= next_tick:
                self.display.update({"text/html": self._html(False), "text/plain": "comparing"}, raw=True)
                next_tick = time.monotonic() + _REFRESH

    def cancel(self) -> None:
        for feeder in self.feeders.values():
            feeder.cancel()

    def collect(self) -> Results:
        """Every engine's results, engine after engine, each in prompt order."""
        results: list[Result] = []
        index: list[Any] | None = [] if self.index is not None else None
        for feeder in self.feeders.values():
            results.extend(feeder.results())
            if index is not None and self.index is not None:
                index.extend(self.index)
        return Results(results, index=index)

    def show_final(self, results: Results) -> None:
        if self.display is not None:
            names = ", ".join(self.feeders)
            self.display.update(
                {"text/html": self._html(True), "text/plain": f"{len(results)} results from {names}"}, raw=True
            )


def _short(text: str, limit: int = 160) -> str:
    folded = " ".join(text.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"


def _cell(item: Handle | Result | None) -> str:
    """One engine's answer to one prompt: its badge, text and figures."""
    if item is None:
        return badge_html("queued", style="inline")
    if isinstance(item, Handle):
        text = item.text
        return badge_html(item.status, style="inline") + f'<div style="white-space:pre-wrap">{html.escape(text)}</div>'
    figures = f"{item.completion_tokens} tok"
    if item.gen_tps:
        figures += f" · {item.gen_tps:.1f} tok/s"
    if item.ttft is not None:
        figures += f" · TTFT {item.ttft:.2f} s"
    badge = "done" if item.ok else item.finish_reason
    body = html.escape(item.text if item.ok else (item.error or item.text))
    return (
        badge_html(badge, style="inline")
        + f'<div style="white-space:pre-wrap">{body}</div>'
        + f'<div style="color:#757575;font-size:11px">{figures}</div>'
    )


def _throughput(feeder: Feeder) -> str:
    done = [i for i in feeder.items if isinstance(i, Result)]
    tokens = sum(r.completion_tokens for r in done)
    seconds = (feeder.ended or time.perf_counter()) - feeder.started
    rate = f", {tokens / seconds:.1f} tok/s" if seconds else ""
    return f"{len(done)}/{feeder.total} done, {tokens} tokens{rate}"
