"""Running a checked ``%nbollama`` call: loading, connecting, status, the bench and the dashboard.

A ``%%generate`` cell's run is in ``_cell``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from IPython.core.error import UsageError

from .. import session
from .._logging import logger
from ..bench import SweepResult, sweep
from ..engine import Engine, EngineLike
from ..exceptions import ModelError, NbollamaError
from ..remote import RemoteEngine
from ..remote._bench import DEFAULT_CONCURRENCY, RemoteSweepResult, remote_sweep
from ._parse_nbollama import BenchCall, ConnectCall, LoadCall
from ._render import (
    NO_ENGINE_MESSAGE,
    applied_inflight_message,
    applied_message,
    default_loaded_for_bench_message,
    default_loaded_message,
)
from ._status import EnginesReport, StatusReport

__all__ = [
    "REFRESH_SECONDS",
    "load_engine",
    "load",
    "connect",
    "run_bench",
    "open_dashboard",
    "named_or_usage",
    "kernel_engine_or_default",
    "status_report",
    "unload_engine",
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
    """``%nbollama load``: replace the kernel's engine (``--as NAME``: the engine of that name)."""
    return load_engine("%nbollama load", call.model, **call.keywords())


def named_or_usage(prog: str, name: str | None) -> EngineLike:
    """The engine called ``name`` (None: the default), or a one-line UsageError listing the names."""
    try:
        return session.engine_named(name)
    except NbollamaError as exc:
        raise UsageError(f"{prog}: {exc}") from None


def status_report(name: str | None) -> StatusReport | EnginesReport | None:
    """``%nbollama status [NAME]``: one engine's report, or every engine's when there are several."""
    if name is not None:
        return StatusReport(named_or_usage("%nbollama status", name).snapshot())
    everyone = session.engines()
    if not everyone:
        print(NO_ENGINE_MESSAGE)
        return None
    if len(everyone) == 1:
        return StatusReport(next(iter(everyone.values())).snapshot())
    return EnginesReport(
        {n: StatusReport(e.snapshot()) for n, e in everyone.items()}, session.current_name()
    )


def unload_engine(name: str | None) -> bool:
    """``%nbollama unload [NAME]``; a name that is not loaded is a UsageError naming those that are."""
    if name is not None:
        named_or_usage("%nbollama unload", name)
    return session.unload(name)


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


def kernel_engine_or_default(prog: str) -> EngineLike:
    """The kernel's engine; the bundled model (``parallel="auto"``) when none is loaded."""
    engine = session.current_engine()
    if engine is not None:
        return engine
    loaded = load_engine(prog, parallel="auto")
    print(default_loaded_message(loaded.summary))
    return loaded


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
    if call.kv_types is not None:
        raise UsageError(
            "%nbollama bench: --kv-type needs an in-kernel engine: a server's KV cache type is set where it "
            "starts (Ollama: OLLAMA_KV_CACHE_TYPE with OLLAMA_FLASH_ATTENTION=1; llama-server: "
            "--cache-type-k/--cache-type-v -fa; vLLM: --kv-cache-dtype). Sweep the types on a local engine "
            "of the same model: its recommendation names the server's setting"
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
        engine.set_max_inflight(
            result.recommended_inflight, reason="set by %nbollama bench --apply"
        )
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
            kv_types=call.kv_types,
        )
    except (ValueError, NbollamaError) as exc:
        raise UsageError(f"%nbollama bench: {exc}") from None
    _show_figure(result.figure())
    if result.quality is not None:
        _show_figure(result.quality.figure())
    if call.apply:
        kv: dict[str, Any] = {"kv_type": result.recommended_kv_type} if result.recommended_kv_type else {}
        with _summary_printed_here():
            applied = engine.spawn(parallel=result.recommended, ctx=engine.ctx, **kv)
        session.set_engine(applied)  # the old context closes; the weights stay loaded
        print(applied_message(result.recommended, applied.summary))
    return result


def open_dashboard() -> Any:
    """``%nbollama dashboard``: a live dashboard that follows the kernel's engine."""
    widgets = importlib.import_module("nbollama.widgets")
    return widgets.dashboard()
