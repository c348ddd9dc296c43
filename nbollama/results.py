"""What ``%%generate`` hands back: the results of one cell, and the handle of a background run.

``Results`` is a read-only list of ``Result`` in prompt order, with the views
a notebook wants (a compact HTML table, ``.texts``, ``.to_pandas()``).
``BackgroundGeneration`` is what a ``--background`` cell returns at once, so
the user can go on working and collect the ``Results`` later.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

from .engine import Handle, Result

if TYPE_CHECKING:
    import pandas

__all__ = ["Results", "BackgroundGeneration"]

_PREVIEW = 100
_COLUMNS = (
    "id",
    "prompt",
    "text",
    "finish_reason",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "ttft",
    "tpot",
    "gen_tps",
    "queue_wait",
    "total_time",
    "slot",
)


def _preview(text: str, limit: int = _PREVIEW) -> str:
    folded = " ".join(text.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.0f} ms"


def _tps(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


class Results(Sequence[Result]):
    """The results of one ``%%generate`` cell, in prompt order.

    A read-only list of ``nbollama.Result`` (index it, loop over it, ``len`` it)
    that shows itself as a compact table in a notebook.
    """

    __slots__ = ("_items",)

    def __init__(self, results: Iterable[Result] = ()) -> None:
        self._items: tuple[Result, ...] = tuple(results)

    @overload
    def __getitem__(self, index: int) -> Result: ...

    @overload
    def __getitem__(self, index: slice) -> Results: ...

    def __getitem__(self, index: int | slice) -> Result | Results:
        if isinstance(index, slice):
            return Results(self._items[index])
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Result]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Results):
            return self._items == other._items
        if isinstance(other, (list, tuple)):
            return list(self._items) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    # -- what people use ------------------------------------------------------------

    @property
    def texts(self) -> list[str]:
        """The generated texts, in prompt order."""
        return [r.text for r in self._items]

    @property
    def ok(self) -> bool:
        """True when every request finished normally (``stop`` or ``length``)."""
        return all(r.ok for r in self._items)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all the prompts."""
        return sum(r.completion_tokens for r in self._items)

    def to_pandas(self) -> pandas.DataFrame:
        """One row per prompt: texts, finish reasons and timings (seconds), ready to plot."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "Results.to_pandas() needs pandas, which is not installed: pip install pandas"
            ) from exc
        rows = [{column: getattr(r, column) for column in _COLUMNS} for r in self._items]
        return pd.DataFrame(rows, columns=list(_COLUMNS))

    # -- how it shows ---------------------------------------------------------------

    def _summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self._items:
            counts[r.finish_reason] = counts.get(r.finish_reason, 0) + 1
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.items())
        noun = "result" if len(self._items) == 1 else "results"
        return f"{len(self._items)} {noun}, {self.completion_tokens} tokens" + (
            f" ({reasons})" if reasons else ""
        )

    def __repr__(self) -> str:
        lines = [f"Results: {self._summary()}"]
        for i, r in enumerate(self._items):
            shown = r.error if r.finish_reason == "error" and r.error else r.text
            lines.append(
                f"[{i}] {r.finish_reason:<9} {r.completion_tokens:>5} tok  {_preview(shown, 72)!r}"
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(
            f'<th style="text-align:left">{name}</th>'
            for name in ("#", "slot", "finish", "tokens", "TTFT", "tok/s", "text")
        )
        rows = []
        for i, r in enumerate(self._items):
            if r.finish_reason == "error" and r.error:
                text = f'<span style="color:#c62828">{html.escape(_preview(r.error))}</span>'
            else:
                text = html.escape(_preview(r.text))
            rows.append(
                "<tr>"
                f"<td>{i}</td><td>{'' if r.slot is None else r.slot}</td>"
                f"<td>{r.finish_reason}</td><td>{r.completion_tokens}</td>"
                f"<td>{_ms(r.ttft)}</td><td>{_tps(r.gen_tps)}</td>"
                f'<td style="text-align:left">{text}</td>'
                "</tr>"
            )
        return (
            '<table class="nbollama-results">'
            f'<caption style="text-align:left">Results: {html.escape(self._summary())}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )


class BackgroundGeneration:
    """A ``%%generate --background`` run that goes on while other cells execute.

    ``done()`` says whether it finished, ``wait()`` (or ``result()``) blocks
    until it has and returns the ``Results``; Ctrl-C while waiting stops the
    wait, not the generation. ``cancel()`` cancels what is still running.
    """

    def __init__(self, handles: Sequence[Handle], *, out: str | None = None) -> None:
        self._handles = tuple(handles)
        self._out = out
        self._finished = threading.Event()
        self._results: Results | None = None

    @property
    def handles(self) -> tuple[Handle, ...]:
        """The engine's handles, one per prompt, in prompt order."""
        return self._handles

    @property
    def out(self) -> str | None:
        """The notebook variable that receives the ``Results`` when done."""
        return self._out

    def _complete(self, results: Results) -> None:
        """Called once by the runner after the last display update (and ``--out``) are done."""
        self._results = results
        self._finished.set()

    def done(self) -> bool:
        """True once every prompt finished and the cell's outputs show the final figures."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Results:
        """Block until done and return the ``Results``; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished.is_set():
            step = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if step <= 0:
                raise TimeoutError(f"the background generation did not finish within {timeout} s")
            self._finished.wait(step)  # short waits keep Ctrl-C responsive
        assert self._results is not None
        return self._results

    def result(self, timeout: float | None = None) -> Results:
        """The same as ``wait()``, named like ``concurrent.futures.Future.result``."""
        return self.wait(timeout)

    def cancel(self) -> int:
        """Cancel the prompts still queued or running; how many were cancelled.

        What they generated so far stays in their results, marked ``cancelled``.
        """
        return sum(1 for h in self._handles if h.cancel())

    def _progress(self) -> str:
        counts: dict[str, int] = {}
        for h in self._handles:
            counts[h.status] = counts.get(h.status, 0) + 1
        return ", ".join(f"{n} {status}" for status, n in counts.items())

    def __repr__(self) -> str:
        n = len(self._handles)
        state = "done" if self.done() else "running"
        out = f", out={self._out!r}" if self._out else ""
        return f"<BackgroundGeneration {n} prompt{'s' if n != 1 else ''} {state}: {self._progress()}{out}>"
