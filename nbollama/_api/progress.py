"""How a long call shows itself: one compact view, whatever the number of prompts.

A progress bar (done/total, tokens/s, ETA, errors), the prompts in the slots
now and the last few results: a few KB per update at a thousand prompts or a
million. Pure functions of a ``ProgressState`` (taken from a ``Feeder`` on the
thread that feeds it), so a big ``%%generate`` cell, ``generate(progress=True)``
in a notebook and the one-line text progress elsewhere say the same thing.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TextIO

from .._palette import BADGE_COLOURS, badge_html
from .cards import short
from .requests import Handle, Result

__all__ = [
    "FeedView",
    "ProgressState",
    "progress_state",
    "progress_html",
    "progress_text",
    "progress_line",
    "progress_bundle",
    "elide_prefix",
    "short",
    "progress_reporter",
]

_PROMPT_CHARS = 60
_TEXT_CHARS = 80
_SLOT_ROWS = 16  # more slots than this: "+N more"
_BAR = 24  # characters of the text bar
_MIN_ELIDED = 16  # a shared prefix shorter than this is shown


@dataclass(frozen=True)
class RunningRow:
    """A prompt of the call that holds a slot now."""

    index: int
    slot: int | None
    status: str
    prompt: str
    tokens: int
    max_tokens: int


@dataclass(frozen=True)
class LatestRow:
    """A prompt that finished lately."""

    index: int
    finish_reason: str
    tokens: int
    text: str
    error: str | None
    forced: int = 0  # of ``tokens``, those its format forced (jump-forward)

    @property
    def counted(self) -> str:
        """``"31 tok"``, or ``"31 tok (14 forced)"``."""
        return f"{self.tokens} tok" + (f" ({self.forced} forced)" if self.forced else "")


@dataclass(frozen=True)
class ProgressState:
    """Where a call stands: counts, speed, the slots' prompts, the latest results."""

    total: int
    sent: int
    done: int
    errors: int
    cancelled: int
    tokens: int  # completion tokens so far, running requests included
    elapsed: float
    running: tuple[RunningRow, ...]
    latest: tuple[LatestRow, ...]
    finished: bool
    stopped: bool
    elide: int = 0  # characters of prompt prefix every prompt shares (not shown)
    replayed: int = 0  # of ``done``, results the store gave (they took no time)
    forced: int = 0  # of ``tokens``, those a format forced (finished prompts)
    store_note: str = ""  # "resumed 3,812 of 5,000 from the store", "412 cached"

    @property
    def tps(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the pace so far; None before the first result."""
        ran = self.done - self.replayed  # the pace of what ran: replayed rows took no time
        if self.finished or ran <= 0 or self.stopped:
            return None
        return (self.total - self.done) * self.elapsed / ran

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def key(self) -> tuple[object, ...]:
        """What a view shows, the clock aside: an update is sent only when it changed."""
        return (
            self.done,
            self.replayed,
            self.tokens,
            self.finished,
            self.stopped,
            tuple((r.index, r.status, r.tokens) for r in self.running),
        )


def elide_prefix(prompts: Sequence[str]) -> int:
    """How many leading characters every prompt shares (cut at a word), when worth hiding.

    A template fanned out by ``--each`` differs only at its end: showing the
    differing part keeps one-line headers telling the prompts apart.
    """
    if len(prompts) < 2:
        return 0
    first, last = min(prompts), max(prompts)
    n = 0
    limit = min(len(first), len(last))
    while n < limit and first[n] == last[n]:
        n += 1
    cut = max(first.rfind(space, 0, n) for space in " \n\t") + 1  # after a word of the shared part
    return cut if cut >= _MIN_ELIDED else 0


class FeedView(Protocol):
    """What a progress view reads of a call's feeding (``feed.Feeder`` has it): no import of the feeder."""

    @property
    def prompts(self) -> Sequence[str]: ...

    @property
    def total(self) -> int: ...
    @property
    def sent(self) -> int: ...
    @property
    def done(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def cancelled(self) -> int: ...
    @property
    def elapsed(self) -> float: ...
    @property
    def finished(self) -> bool: ...
    @property
    def stopped(self) -> bool: ...
    @property
    def replayed(self) -> int: ...
    @property
    def forced(self) -> int: ...
    @property
    def store_note(self) -> str: ...
    def running(self) -> list[tuple[int, Handle]]: ...
    def latest(self) -> list[tuple[int, Result]]: ...
    def tokens_so_far(self) -> int: ...


def progress_state(feeder: FeedView, *, elide: int = 0) -> ProgressState:
    """The feeder's state now (call it on the thread that feeds)."""
    running = tuple(
        RunningRow(i, h.slot, h.status, h.prompt, h.completion_tokens, h.max_tokens)
        for i, h in sorted(feeder.running(), key=lambda item: item[1].slot or 0)
    )  # in slot order: a slot's row stays where it was
    latest = tuple(
        LatestRow(i, r.finish_reason, r.completion_tokens, r.text, r.error, r.forced_tokens)
        for i, r in feeder.latest()[:5]
    )
    return ProgressState(
        total=feeder.total,
        sent=feeder.sent,
        done=feeder.done,
        errors=feeder.errors,
        cancelled=feeder.cancelled,
        tokens=feeder.tokens_so_far(),
        elapsed=feeder.elapsed,
        running=running,
        latest=latest,
        finished=feeder.finished,
        stopped=feeder.stopped,
        elide=elide,
        replayed=feeder.replayed,
        forced=feeder.forced,
        store_note=feeder.store_note,
    )


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _figures(state: ProgressState) -> list[str]:
    parts = [state.store_note] if state.store_note else []
    ran = state.done - state.replayed
    if state.tokens == 0 and ran > 0:  # scored, not generated (choices): prompts are the unit
        parts.append(f"{ran / state.elapsed if state.elapsed > 0 else 0.0:.1f} prompts/s")
    else:
        forced = f" ({state.forced} forced)" if state.forced else ""
        parts += [f"{state.tokens} tokens{forced}", f"{state.tps:.1f} tok/s"]
    if state.eta is not None:
        parts.append(f"ETA {_clock(state.eta)}")
    parts.append(f"{_clock(state.elapsed)} elapsed")
    parts.append(f"{state.errors} error{'' if state.errors == 1 else 's'}")
    if state.cancelled:
        parts.append(f"{state.cancelled} cancelled")
    if state.stopped:
        parts.append(f"stopped: {state.total - state.done} not done")
    return parts


def progress_line(state: ProgressState) -> str:
    """One line: the text bar and the figures (for a terminal)."""
    filled = int(state.fraction * _BAR)
    bar = "#" * filled + "." * (_BAR - filled)
    return f"nbollama [{bar}] {state.done}/{state.total} · " + " · ".join(_figures(state))


def progress_text(state: ProgressState) -> str:
    """The plain-text twin of ``progress_html``: the line, the slots, the latest results."""
    lines = [progress_line(state)]
    for r in state.running[:_SLOT_ROWS]:
        lines.append(
            f"  slot {r.slot}: #{r.index + 1} {r.status} {r.tokens}/{r.max_tokens} {short(r.prompt, _PROMPT_CHARS, state.elide)}"
        )
    for d in state.latest:
        shown = d.error if d.finish_reason == "error" and d.error else d.text
        lines.append(
            f"  #{d.index + 1} {d.finish_reason} {d.counted}: {short(shown, _TEXT_CHARS)}"
        )
    return "\n".join(lines)


_CELL = 'style="text-align:left;padding:1px 8px 1px 0;white-space:nowrap"'
_WIDE = 'style="text-align:left;padding:1px 0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;max-width:40em"'


def _bar_html(state: ProgressState) -> str:
    ended = "error" if state.errors and state.finished else "done"
    colour = BADGE_COLOURS[
        "cancelled" if state.stopped else ended if state.finished else "generating"
    ]
    return (
        '<div class="nbollama-bar" style="flex:0 0 240px;height:10px;border-radius:5px;overflow:hidden;'
        'background:var(--jp-layout-color3,#e0e0e0)">'
        f'<div style="width:{100 * state.fraction:.1f}%;height:100%;background:{colour}"></div></div>'
    )


def progress_html(state: ProgressState, *, title: str = "") -> str:
    """The compact view: the bar with its figures, the slots' prompts, the last results."""
    counts = (
        f'<span class="nbollama-counts"><b>{state.done}/{state.total}</b> done · '
        + html.escape(" · ".join(_figures(state)))
        + "</span>"
    )
    head = (
        '<div style="display:flex;align-items:center;gap:8px;flex-wrap:wrap">'
        + (f"<b>{html.escape(title)}</b>" if title else "")
        + _bar_html(state)
        + counts
        + "</div>"
    )
    parts = [head]
    if state.running:
        rows = "".join(
            f"<tr><td {_CELL}>slot {'–' if r.slot is None else r.slot}</td><td {_CELL}>{badge_html(r.status, style='inline')}</td>"
            f"<td {_CELL}>#{r.index + 1}</td><td {_CELL}>{r.tokens}/{r.max_tokens}</td>"
            f"<td {_WIDE}>{html.escape(short(r.prompt, _PROMPT_CHARS, state.elide))}</td></tr>"
            for r in state.running[:_SLOT_ROWS]
        )
        more = len(state.running) - _SLOT_ROWS
        if more > 0:
            rows += f'<tr><td colspan="5" {_CELL}>+{more} more</td></tr>'
        parts.append(f'<table class="nbollama-slots" style="margin-top:4px">{rows}</table>')
    if state.latest:
        rows = ""
        for r in state.latest:
            if r.finish_reason == "error" and r.error:
                shown = (
                    f'<span style="color:#c62828">{html.escape(short(r.error, _TEXT_CHARS))}</span>'
                )
            else:
                shown = html.escape(short(r.text, _TEXT_CHARS))
            rows += (
                f"<tr><td {_CELL}>#{r.index + 1}</td><td {_CELL}>{html.escape(r.finish_reason)}</td>"
                f"<td {_CELL}>{r.counted}</td><td {_WIDE}>{shown}</td></tr>"
            )
        parts.append(
            '<div style="margin-top:4px;color:var(--jp-ui-font-color2,#666)">latest</div>'
            f'<table class="nbollama-latest">{rows}</table>'
        )
    return (
        '<div class="nbollama-progress" style="font-size:12px;line-height:1.5">'
        + "".join(parts)
        + "</div>"
    )


def progress_bundle(state: ProgressState, *, title: str = "") -> dict[str, str]:
    """The view as a display bundle (HTML and its plain-text twin)."""
    return {"text/html": progress_html(state, title=title), "text/plain": progress_text(state)}


# -- reporters: a notebook display, or a line on stderr ---------------------------------------


class _NotebookProgress:
    """A display updated from the calling thread (the cell's), at most as often as it is asked."""

    def __init__(self, feeder: FeedView) -> None:
        from IPython.display import display

        self.feeder = feeder
        self.elide = elide_prefix(feeder.prompts) if feeder.total <= 10_000 else 0
        state = progress_state(feeder, elide=self.elide)
        self._key = state.key()
        self.handle = display(  # type: ignore[no-untyped-call]  # IPython: no annotations
            progress_bundle(state), raw=True, display_id=True
        )

    def update(self) -> None:
        state = progress_state(self.feeder, elide=self.elide)
        if state.key() == self._key and not state.finished:
            return
        self._key = state.key()
        self.handle.update(progress_bundle(state), raw=True)

    def close(self) -> None:
        """The last state: the bar and its figures (the results are the call's value)."""
        state = replace(progress_state(self.feeder, elide=self.elide), running=(), latest=())
        self.handle.update(progress_bundle(state), raw=True)


class _TextProgress:
    """One line on stderr, rewritten in place (``\\r``), ended with a newline."""

    def __init__(self, feeder: FeedView, stream: TextIO | None = None) -> None:
        self.feeder = feeder
        self.stream = stream if stream is not None else sys.stderr
        self._width = 0
        self.update()

    def _write(self, line: str, end: str = "") -> None:
        padded = line.ljust(self._width)
        self._width = len(line)
        try:
            self.stream.write("\r" + padded + end)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stream must not break the generation

    def update(self) -> None:
        self._write(progress_line(progress_state(self.feeder)))

    def close(self) -> None:
        self._write(progress_line(progress_state(self.feeder)), "\n")


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell: Any = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_reporter(feeder: FeedView) -> _NotebookProgress | _TextProgress:
    """The progress view for ``generate(progress=True)``: a live display in a notebook
    kernel, a line on stderr anywhere else."""
    return _NotebookProgress(feeder) if _in_notebook() else _TextProgress(feeder)
