"""A ``%%generate`` cell's run: feeding its prompts, streaming them into its display.

A cell's prompts go through a ``Feeder`` (``nbollama._api.feed``), exactly as
``engine.generate`` does: as many as fit in one ``submit_many``, the rest as
the queue drains, in big chunks. So a cell of any size flows through the
engine's bounded queue, and the same greedy cell at the same ``parallel``
gives the same texts as ``engine.generate()`` on its prompts, every time.
The cell's thread (foreground) or a thread of its own (``--background``)
feeds, and refreshes the display at most every ``REFRESH_SECONDS``, never
once per token: a card per prompt up to ``CARDS_MAX`` prompts, one compact
progress view above (``--cards`` forces the cards).
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.display import DisplayHandle, display

from .._api.feed import Feeder, window_of
from .._api.progress import elide_prefix, progress_state
from .._logging import logger
from ..engine import EngineLike, Handle, Result
from ..exceptions import NbollamaError
from ..results import BackgroundGeneration, Results
from ._compare import start_compare
from ._parse_generate import GenerateCall
from ._render import (
    CARDS_MAX,
    big_final_bundle,
    big_live_bundle,
    final_bundle,
    live_bundle,
)
from ._run import REFRESH_SECONDS, kernel_engine_or_default, named_or_usage

__all__ = ["CellRun", "start_cell", "run_in_foreground", "run_in_background", "run_compared"]


# -- one cell's requests and their display ------------------------------------------------------


class CellRun:
    """The prompts of one ``%%generate`` cell, fed to the engine, and the display that shows them.

    Everything here runs on one thread, the one that calls ``pump`` (the
    cell's, or a background cell's own): feeding, tokenizing and rendering.
    """

    def __init__(
        self,
        shell: Any,
        feeder: Feeder,
        *,
        live: bool,
        markdown: bool,
        cards: bool = False,
        out: str | None = None,
        index: Sequence[Any] | None = None,
    ) -> None:
        self.shell = shell
        self.feeder = feeder
        self.live = live
        self.markdown = markdown
        self.cards = cards or feeder.total <= CARDS_MAX
        self.out = out
        self.index = index
        self.elide = elide_prefix(feeder.prompts) if feeder.total <= 100_000 else 0
        self.display: DisplayHandle | None = None
        self.origin: dict[str, Any] | None = None  # the header of the cell that made the display
        self.all_done = threading.Event()  # set once the results are collected
        self._shown: object = None
        self._shown_at = 0.0

    @property
    def handles(self) -> list[Handle]:
        """The cell's requests inside the engine now (queued or running)."""
        return self.feeder.handles

    def _items(self) -> list[Handle | Result | str]:
        return [
            self.feeder.prompts[i] if item is None else item
            for i, item in enumerate(self.feeder.items)
        ]

    def _state(self) -> object:
        if self.cards:
            return tuple(
                (h.status, h.slot, h.completion_tokens, h.done()) if isinstance(h, Handle) else h
                for h in self.feeder.items
            )
        return progress_state(self.feeder, elide=self.elide).key()

    def _bundle(self) -> dict[str, str]:
        if self.cards:
            return live_bundle(self._items(), elide=self.elide)
        return big_live_bundle(progress_state(self.feeder, elide=self.elide))

    def show(self) -> None:
        """The first display, from the cell's own thread so it belongs to that cell."""
        if not self.live:
            return
        self._shown = self._state()
        self._shown_at = time.monotonic()
        publisher = getattr(self.shell, "display_pub", None)
        if publisher is not None and hasattr(publisher, "set_thread_parent"):
            self.origin = dict(publisher.parent_header)
        self.display = display(self._bundle(), raw=True, display_id=True)

    def _update(self, bundle: dict[str, str]) -> None:
        """``update_display_data`` that reaches the display from any thread, in any frontend.

        JupyterLab applies an update only in the output area of the cell whose
        request the message answers, so a background thread sends it as the
        cell that made the display (ipykernel's ``set_thread_parent``). nbclient
        only reads messages of the cell executing now (ipykernel's default for
        threads): when that is another cell, a second copy goes as that cell.
        """
        assert self.display is not None
        publisher = self.shell.display_pub
        if self.origin is None:
            self.display.update(bundle, raw=True)
            return
        current = dict(publisher.parent_header)
        token = publisher.set_thread_parent(self.origin)
        try:
            self.display.update(bundle, raw=True)
        finally:
            publisher.reset_thread_parent(token)
        if current.get("msg_id") != self.origin.get("msg_id"):
            self.display.update(bundle, raw=True)

    def refresh(self) -> None:
        """Update the display if anything changed since the last update (the big view's
        clock, ETA and tok/s move on at least once a second)."""
        if self.display is None:
            return
        state = self._state()
        now = time.monotonic()
        if state == self._shown and (self.cards or now - self._shown_at < _CLOCK_SECONDS):
            return
        self._shown = state
        self._shown_at = now
        self._update(self._bundle())

    def pump(self) -> None:
        """Feed and refresh (at most every REFRESH_SECONDS) until every prompt finished."""
        self.feeder.run(self.refresh, REFRESH_SECONDS)

    def collect(self) -> Results:
        """Every prompt's result, in prompt order (call it once ``pump`` returned or after ``cancel``)."""
        return Results(self.feeder.results(), index=self.index)

    def show_final(self, results: Results, *, table: bool = False) -> None:
        if self.display is None:
            return
        if self.cards:
            self._update(final_bundle(results, markdown=self.markdown, elide=self.elide))
        else:
            state = progress_state(self.feeder, elide=self.elide)
            self._update(big_final_bundle(state, results, out=self.out, table=table))

    def cancel(self, timeout: float = 10.0) -> Results:
        """Send nothing more, cancel what is in the engine, wait for it; every prompt's result."""
        self.feeder.cancel(timeout)
        return self.collect()


#: A big cell's view updates at least this often while anything runs (its clock and ETA).
_CLOCK_SECONDS = 1.0


def _feeder(engine: EngineLike, call: GenerateCall) -> Feeder:
    """The cell's prompts, fed to the engine; the first chunk goes now, so an engine's
    refusal (a closed engine, a parameter it does not take) is a UsageError before any display."""
    try:
        run = engine.open_store_run(call.prompts, dict(call.params))
        feeder = Feeder(call.prompts, engine.submit_many, call.params, window=window_of(engine), run=run)
        feeder.feed()
    except NbollamaError as exc:
        raise UsageError(f"{call.prog}: {exc}") from None
    return feeder


def _freeze_when_done(run: CellRun, board: Any) -> None:
    """A ``--watch`` dashboard stops updating (keeping its last state) once its cell's requests end."""
    try:
        run.all_done.wait()
        board.stop()
    except Exception:  # a thread's traceback would land in whatever cell runs now
        logger.exception("nbollama: freezing a --watch dashboard failed")


def _watch(engine: EngineLike, run: CellRun) -> None:
    """``--watch``: a compact dashboard above the cell's outputs, frozen when its requests end."""
    widgets = importlib.import_module("nbollama.widgets")
    board = widgets.dashboard(engine, compact=True)
    display(board)
    threading.Thread(
        target=_freeze_when_done, args=(run, board), name="nbollama-watch", daemon=True
    ).start()


def start_cell(shell: Any, call: GenerateCall) -> CellRun:
    """Start feeding the cell's prompts to the kernel's engine (loading the bundled model if none is),
    or to the one ``--model NAME`` names."""
    engine = (
        named_or_usage(f"{call.prog} --model", call.model)
        if call.model is not None
        else kernel_engine_or_default(call.prog)
    )
    feeder = _feeder(engine, call)
    run = CellRun(
        shell,
        feeder,
        live=not call.quiet,
        markdown=call.markdown,
        cards=call.cards,
        out=call.out,
        index=call.index,
    )
    if call.watch:
        try:
            _watch(engine, run)
        except BaseException:
            feeder.stop()
            raise
    return run


def run_compared(call: GenerateCall, store: Callable[[Results], None]) -> Results:
    """``--models a,b``: every prompt to each engine, side by side; Ctrl-C cancels them all."""
    engines = {name: named_or_usage(f"{call.prog} --models", name) for name in call.models}
    run = start_compare(engines, call)
    try:
        run.show()
        run.pump()
    except BaseException:
        run.cancel()
        raise
    results = run.collect()
    run.show_final(results)
    store(results)
    return results


def run_in_foreground(run: CellRun, store: Callable[[Results], None]) -> Results:
    """Feed and stream until done. Ctrl-C cancels what has not finished, keeps (and stores) every
    result so far, the partial texts included, then re-raises with them as ``.results``."""
    try:
        run.show()
        run.pump()
    except KeyboardInterrupt:
        try:
            results = run.cancel(timeout=10)
        except TimeoutError:
            logger.warning("nbollama: cancelled requests did not finish within 10 s")
            raise KeyboardInterrupt from None
        finally:
            run.all_done.set()
        run.show_final(results)
        store(results)
        _attach_results(results)
        raise
    except BaseException:
        run.feeder.stop()
        run.all_done.set()
        raise
    results = run.collect()
    run.all_done.set()
    run.show_final(results)
    store(results)
    return results


def _attach_results(results: Results) -> None:
    """The re-raised KeyboardInterrupt carries the results too, as ``generate()``'s does
    (``sys.last_value.results`` after the cell)."""
    exc = sys.exc_info()[1]
    if exc is not None:
        exc.results = results  # type: ignore[attr-defined]  # added to the exception


def _drive_in_background(
    run: CellRun, job: BackgroundGeneration, store: Callable[[Results], None]
) -> None:
    """The background thread of a ``--background`` cell: feed and refresh, then finish the job."""
    try:
        run.pump()
    except Exception:
        logger.exception("nbollama: feeding a background cell failed; its requests are cancelled")
        run.feeder.stop()
        _wait_quietly(run)
    results = run.collect()
    run.all_done.set()
    try:
        run.show_final(results, table=True)
    except Exception:
        logger.exception("nbollama: the final update of a background cell's display failed")
    try:
        store(results)
    except Exception:
        logger.exception("nbollama: storing a background cell's results failed")
    job._complete(results)


def _wait_quietly(run: CellRun) -> None:
    try:
        run.feeder.cancel(timeout=30)
    except Exception:
        logger.exception("nbollama: a background cell's requests did not end")


def run_in_background(
    run: CellRun, out: str | None, store: Callable[[Results | BackgroundGeneration], None]
) -> BackgroundGeneration:
    """Return at once; a thread feeds, streams the display and stores the ``Results`` when done."""
    job = BackgroundGeneration(out=out, feeder=run.feeder)
    store(job)  # the handle now; the Results replace it when done
    try:
        run.show()
    except BaseException:
        run.feeder.stop()
        raise
    thread = threading.Thread(
        target=_drive_in_background,
        args=(run, job, store),
        name="nbollama-generate-background",
        daemon=True,
    )
    thread.start()
    return job


