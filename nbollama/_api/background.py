"""What a ``%%generate --background`` cell returns at once, so the user can go on
working and collect the ``Results`` later."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from ..exceptions import RequestTimeoutError
from .feed import Feeder
from .requests import Handle
from .results import Results

__all__ = ["BackgroundGeneration"]


class BackgroundGeneration:
    """A ``%%generate --background`` run that goes on while other cells execute.

    ``done()`` says whether it finished, ``wait()`` (or ``result()``) blocks
    until it has and returns the ``Results``; Ctrl-C while waiting stops the
    wait, not the generation. ``cancel()`` cancels what is still running.
    """

    def __init__(
        self,
        handles: Sequence[Handle] = (),
        *,
        out: str | None = None,
        feeder: Feeder | None = None,
    ) -> None:
        self._handles = tuple(handles)
        self._feeder = feeder
        self._out = out
        self._finished = threading.Event()
        self._results: Results | None = None

    @property
    def handles(self) -> tuple[Handle, ...]:
        """The engine's handles of the prompts being served now, in prompt order
        (a long cell's prompts are fed in as the queue drains; finished ones are results)."""
        if self._feeder is not None:
            return tuple(self._feeder.handles)
        return self._handles

    @property
    def progress(self) -> tuple[int, int]:
        """(finished, total) prompts so far."""
        if self._feeder is not None:
            return self._feeder.done, self._feeder.total
        return sum(1 for h in self._handles if h.done()), len(self._handles)

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
                raise RequestTimeoutError(f"the background generation did not finish within {timeout} s")
            self._finished.wait(step)  # short waits keep Ctrl-C responsive
        assert self._results is not None
        return self._results

    def result(self, timeout: float | None = None) -> Results:
        """The same as ``wait()``, named like ``concurrent.futures.Future.result``."""
        return self.wait(timeout)

    def cancel(self) -> int:
        """Cancel the prompts still queued or running, and those not sent yet; how many.

        What they generated so far stays in their results, marked ``cancelled``.
        """
        if self._feeder is not None:
            return self._feeder.stop()
        return sum(1 for h in self._handles if h.cancel())

    def _progress(self) -> str:
        if self._feeder is not None:
            f = self._feeder
            running = len(f.handles)
            parts = [f"{f.done}/{f.total} done"]
            if running:
                parts.append(f"{running} in the engine")
            if f.errors:
                parts.append(f"{f.errors} errors")
            return ", ".join(parts)
        counts: dict[str, int] = {}
        for h in self._handles:
            counts[h.status] = counts.get(h.status, 0) + 1
        return ", ".join(f"{n} {status}" for status, n in counts.items())

    def __repr__(self) -> str:
        n = self._feeder.total if self._feeder is not None else len(self._handles)
        state = "done" if self.done() else "running"
        out = f", out={self._out!r}" if self._out else ""
        return f"<BackgroundGeneration {n} prompt{'s' if n != 1 else ''} {state}: {self._progress()}{out}>"
