"""Running a checked call: loading, queueing a cell's prompts, streaming them into its display.

A cell's prompts are queued in one step (``engine.submit_many``), so the same
greedy cell at the same ``parallel`` forms the same batches, and gives the
same texts, every time. Its display is refreshed at most every
``REFRESH_SECONDS`` from the cell's thread (foreground) or from a thread of
its own (``--background``), never once per token.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from IPython.core.error import UsageError
from IPython.display import DisplayHandle, display

from .. import session
from .._logging import logger
from ..bench import SweepResult, sweep
from ..engine import Engine, EngineLike, Handle
from ..exceptions import ModelError, NbollamaError
from ..remote import RemoteEngine
from ..remote._bench import DEFAULT_CONCURRENCY, RemoteSweepResult, remote_sweep
from ..results import BackgroundGeneration, Results
from ._parse import BenchCall, ConnectCall, GenerateCall, LoadCall
from ._render import (
    applied_inflight_message,
    applied_message,
    default_loaded_for_bench_message,
    default_loaded_message,
    final_bundle,
    live_bundle,
)

__all__ = [
    "REFRESH_SECONDS",
    "CellRun",
    "load_engine",
    "load",
    "connect",
    "start_cell",
    "run_in_foreground",
    "run_in_background",
    "run_bench",
    "open_dashboard",
]

#: Seconds between two updates of a cell's live display (about 4 Hz, never per token).
REFRESH_SECONDS = 0.25


# -- loading ----------------------------------------------------------------------------------


class _DropSummary(logging.Filter):
    """Drop the engine's own summary line on this thread: the magic prints it itself."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.thread == self.thread
            and record.levelno == logging.INFO
            and record.getMessage().startswith(("nbollama: model=", "nbollama: connected to "))
        )


@contextmanager
def _summary_printed_here() -> Iterator[None]:
    drop = _DropSummary()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_engine(prog: str, model: str | None = None, **options: Any) -> Engine:
    """``session.load`` with model and parameter errors as one-line UsageErrors."""
    had_engine = session.current_engine() is not None
    try:
        with _summary_printed_here():
            return session.load(model, **options)
    except ModelError as exc:
        message = f"{prog}: cannot load {exc.path}: {exc.reason}"
    except NbollamaError as exc:
        message = f"{prog}: {exc}"
    if had_engine:
        if session.current_engine() is None:
            message += " (the previous engine was closed; no engine is loaded now)"
        else:
            message += " (the previous engine is still loaded)"
    raise UsageError(message)


def load(call: LoadCall) -> Engine:
    """``%nbollama load``: replace the kernel's engine."""
    return load_engine("%nbollama load", call.model, **call.options())


def connect(call: ConnectCall) -> RemoteEngine:
    """``%nbollama connect``: a server becomes the kernel's engine (the current one stays if it cannot)."""
    had_engine = session.current_engine() is not None
    try:
        with _summary_printed_here():
            return session.connect(call.url, **call.options())
    except NbollamaError as exc:
        message = f"%nbollama connect: {exc}"
    if had_engine:
        message += " (the previous engine is still loaded)"
    raise UsageError(message)


def _kernel_engine_or_default(prog: str) -> EngineLike:
    """The kernel's engine; the bundled model (``parallel="auto"``) when none is loaded."""
    engine = session.current_engine()
    if engine is not None:
        return engine
    loaded = load_engine(prog, parallel="auto")
    print(default_loaded_message(loaded.summary))
    return loaded


# -- one cell's requests and their display ------------------------------------------------------


class CellRun:
    """The requests of one ``%%generate`` cell and the display that shows them."""

    def __init__(
        self, shell: Any, handles: Sequence[Handle], *, live: bool, markdown: bool
    ) -> None:
        self.shell = shell
        self.handles = list(handles)
        self.live = live
        self.markdown = markdown
        self.display: DisplayHandle | None = None
        self.origin: dict[str, Any] | None = None  # the header of the cell that made the display
        self.all_done = threading.Event()
        self._remaining = len(self.handles)
        self._lock = threading.Lock()
        self._shown: tuple[object, ...] | None = None
        if not self.handles:
            self.all_done.set()
        for handle in self.handles:
            handle.add_done_callback(self._one_done)

    def _one_done(self, _handle: Handle) -> None:  # the engine's thread: keep it short
        with self._lock:
            self._remaining -= 1
            if self._remaining <= 0:
                self.all_done.set()

    def _state(self) -> tuple[object, ...]:
        return tuple((h.status, h.slot, h.completion_tokens, h.done()) for h in self.handles)

    def show(self) -> None:
        """The first display, from the cell's own thread so it belongs to that cell."""
        if not self.live:
            return
        self._shown = self._state()
        publisher = getattr(self.shell, "display_pub", None)
        if hasattr(publisher, "set_thread_parent"):
            self.origin = dict(publisher.parent_header)
        self.display = display(live_bundle(self.handles), raw=True, display_id=True)

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
        """Update the display if anything changed since the last update."""
        if self.display is None:
            return
        state = self._state()
        if state == self._shown:
            return
        self._shown = state
        self._update(live_bundle(self.handles))

    def pump(self) -> None:
        """Refresh at most every REFRESH_SECONDS until every request finished."""
        while not self.all_done.wait(REFRESH_SECONDS):
            self.refresh()

    def collect(self, timeout: float | None = None) -> Results:
        return Results(h.result(timeout) for h in self.handles)

    def show_final(self, results: Results) -> None:
        if self.display is None:
            return
        self._update(final_bundle(results, markdown=self.markdown))

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


def _queue_prompts(engine: EngineLike, call: GenerateCall) -> list[Handle]:
    """Queue every prompt of the cell in one step, or none: a full queue stops the whole cell."""
    try:
        return engine.submit_many(call.prompts, **call.params)
    except NbollamaError as exc:
        raise UsageError(f"{call.prog}: {exc}") from None


def _freeze_when_done(handles: Sequence[Handle], board: Any) -> None:
    """A ``--watch`` dashboard stops updating (keeping its last state) once its cell's requests end."""
    try:
        for handle in handles:
            handle.result()
        board.stop()
    except Exception:  # a thread's traceback would land in whatever cell runs now
        logger.exception("nbollama: freezing a --watch dashboard failed")


def _watch(engine: EngineLike, handles: Sequence[Handle]) -> None:
    """``--watch``: a compact dashboard above the cell's outputs, frozen when its requests end."""
    widgets = importlib.import_module("nbollama.widgets")
    board = widgets.dashboard(engine, compact=True)
    display(board)
    threading.Thread(
        target=_freeze_when_done, args=(handles, board), name="nbollama-watch", daemon=True
    ).start()


def start_cell(shell: Any, call: GenerateCall) -> CellRun:
    """Queue the cell's prompts on the kernel's engine (loading the bundled model if none is)."""
    engine = _kernel_engine_or_default(call.prog)
    handles = _queue_prompts(engine, call)
    if call.watch:
        try:
            _watch(engine, handles)
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
    return CellRun(shell, handles, live=not call.quiet, markdown=call.markdown)


def run_in_foreground(run: CellRun, store: Callable[[Results], None]) -> Results:
    """Stream until done. Ctrl-C cancels the requests, keeps (and stores) their partial text, re-raises."""
    try:
        run.show()
        run.pump()
    except KeyboardInterrupt:
        run.cancel()
        try:
            results = run.collect(timeout=10)
        except TimeoutError:
            logger.warning("nbollama: cancelled requests did not finish within 10 s")
            raise KeyboardInterrupt from None
        run.show_final(results)
        store(results)
        raise
    results = run.collect()
    run.show_final(results)
    store(results)
    return results


def _drive_in_background(
    run: CellRun, job: BackgroundGeneration, store: Callable[[Results], None]
) -> None:
    """The background thread of a ``--background`` cell: refresh, then finish the job."""
    try:
        run.pump()
    except Exception:
        logger.exception("nbollama: updating a background cell's display failed")
    results = run.collect()
    try:
        run.show_final(results)
    except Exception:
        logger.exception("nbollama: the final update of a background cell's display failed")
    try:
        store(results)
    except Exception:
        logger.exception("nbollama: storing a background cell's results failed")
    job._complete(results)


def run_in_background(
    run: CellRun, out: str | None, store: Callable[[Results | BackgroundGeneration], None]
) -> BackgroundGeneration:
    """Return at once; a thread streams the display and stores the ``Results`` when done."""
    job = BackgroundGeneration(run.handles, out=out)
    store(job)  # the handle now; the Results replace it when done
    try:
        run.show()
    except BaseException:
        run.cancel()
        raise
    thread = threading.Thread(
        target=_drive_in_background,
        args=(run, job, store),
        name="nbollama-generate-background",
        daemon=True,
    )
    thread.start()
    return job


# -- %nbollama bench and dashboard ---------------------------------------------------------------


def _show_figure(figure: Any) -> None:
    import plotly.io as pio

    # plotly picks its renderer when first imported; imported outside a kernel it has none
    pio.show(figure, renderer=pio.renderers.default or "plotly_mimetype+notebook")


def run_remote_bench(engine: RemoteEngine, call: BenchCall) -> RemoteSweepResult:
    """The concurrency sweep against the server; ``--apply`` sets this kernel's in-flight limit."""
    if call.ctx is not None:
        raise UsageError(
            "%nbollama bench: --ctx is the server's own setting; against a server the sweep varies "
            "only how many requests are in flight (--concurrency)"
        )
    try:
        result = remote_sweep(
            engine,
            concurrency=call.parallel or DEFAULT_CONCURRENCY,
            n_prompts=call.prompts,
            max_tokens=call.max_tokens,
        )
    except (ValueError, NbollamaError) as exc:
        raise UsageError(f"%nbollama bench: {exc}") from None
    _show_figure(result.figure())
    if call.apply:
        engine.set_max_inflight(result.recommended_inflight, reason="set by %nbollama bench --apply")
        print(applied_inflight_message(result.recommended_inflight, engine.url))
    return result


def run_bench(call: BenchCall) -> SweepResult | RemoteSweepResult:
    """The parallelism sweep on the kernel's engine; ``--apply`` switches it to the recommended value."""
    engine = session.current_engine()
    if engine is None:
        engine = load_engine("%nbollama bench")
        print(default_loaded_for_bench_message(engine.summary))
    if isinstance(engine, RemoteEngine):
        return run_remote_bench(engine, call)
    if not isinstance(engine, Engine):
        raise UsageError(
            f"%nbollama bench: the sweep needs an in-kernel engine (nbollama.Engine), "
            f"not {type(engine).__name__}"
        )
    try:
        result = sweep(
            engine,
            parallel=call.parallel or (1, 2, 4, 8),
            n_prompts=call.prompts,
            max_tokens=call.max_tokens,
            ctx=call.ctx,
        )
    except ValueError as exc:
        raise UsageError(f"%nbollama bench: {exc}") from None
    _show_figure(result.figure())
    if call.apply:
        with _summary_printed_here():
            applied = engine.spawn(parallel=result.recommended, ctx=engine.ctx)
        session.set_engine(applied)  # the old context closes; the weights stay loaded
        print(applied_message(result.recommended, applied.summary))
    return result


def open_dashboard() -> Any:
    """``%nbollama dashboard``: a live dashboard that follows the kernel's engine."""
    widgets = importlib.import_module("nbollama.widgets")
    return widgets.dashboard()
