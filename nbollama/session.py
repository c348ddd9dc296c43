"""The kernel's engine: the one the magics, the dashboard and the side panel all look at.

A notebook has one engine at a time. ``load`` replaces it cleanly (the old
one's requests are cancelled and its memory freed before the new one loads),
``connect`` makes a remote server the engine (``load`` switches back), and
views follow replacements through ``on_engine_change``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from ._api.protocol import EngineLike
from ._api.requests import Result
from ._core._config import LoadOptions
from ._core._engine import Engine
from ._logging import logger
from .models import resolve_model

if TYPE_CHECKING:
    import ssl

    from .remote import RemoteEngine

__all__ = [
    "current_engine",
    "set_engine",
    "load",
    "unload",
    "connect",
    "disconnect",
    "on_engine_change",
    "generate",
    "agenerate",
]

_lock = threading.RLock()
_engine: EngineLike | None = None
_listeners: list[Callable[[EngineLike | None], object]] = []


def current_engine() -> EngineLike | None:
    """The kernel's engine, or None when none is loaded (or it was closed)."""
    engine = _engine
    return engine if engine is not None and not engine.closed else None


def set_engine(engine: EngineLike | None, *, close_previous: bool = True) -> None:
    """Make ``engine`` the kernel's engine and tell the views."""
    global _engine
    with _lock:
        previous = _engine
        # closed first: if closing fails (say, from an engine's own thread) nothing changes
        if close_previous and previous is not None and previous is not engine:
            previous.close()
        _engine = engine
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(engine)
        except Exception:
            logger.warning("nbollama: an engine-change listener failed", exc_info=True)


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    parallel: int | Literal["auto"] = "auto",
    **options: Any,
) -> Engine:
    """Load a model as the kernel's engine, closing the one before it first (memory is freed first).

    Arguments and the model file are checked before the old engine is closed,
    so a typo leaves a working engine in place.
    """
    LoadOptions.check(parallel=parallel, **options)
    model = resolve_model(model)
    set_engine(None)
    engine = Engine.load(model, parallel=parallel, **options)
    set_engine(engine)
    return engine


def unload() -> bool:
    """Close the kernel's engine; False if there was none."""
    had = current_engine() is not None
    set_engine(None)
    return had


def connect(
    url: str,
    *,
    kind: str = "auto",
    model: str | None = None,
    api_key_env: str | None = None,
    max_inflight: int | None = None,
    timeout: float = 300.0,
    ca_bundle: str | None = None,
    verify: bool | ssl.SSLContext = True,
) -> RemoteEngine:
    """Make the server at ``url`` the kernel's engine (llama-server, Ollama, vLLM, OpenAI-compatible).

    The arguments are checked and the server is found (``kind="auto"``: from
    its own endpoints) before the current engine is closed, so a wrong URL or
    an unreachable server leaves the working engine in place. The API key, if
    any, comes from the environment variable named by ``api_key_env``.
    ``load`` switches back to an in-kernel engine. See ``nbollama.remote.connect``.
    """
    from .remote import ConnectOptions, open_remote

    options = ConnectOptions(
        url,
        kind=kind,
        model=model,
        api_key_env=api_key_env,
        max_inflight=max_inflight,
        timeout=timeout,
        ca_bundle=ca_bundle,
        verify=verify,
    )
    url = options.endpoint.shown  # credentials out of this frame's locals (verbose tracebacks)
    engine = open_remote(options)
    try:
        set_engine(engine)
    except BaseException:
        engine.close()
        raise
    logger.info(engine.summary)
    return engine


def disconnect() -> bool:
    """Close the kernel's engine, as ``unload`` does; a remote server keeps running. False if there was none."""
    return unload()


def on_engine_change(listener: Callable[[EngineLike | None], object]) -> Callable[[], None]:
    """Call ``listener(engine_or_None)`` whenever the kernel's engine changes; returns the unsubscriber."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def _engine_or_default() -> EngineLike:
    with _lock:
        engine = current_engine()
        if engine is None:
            engine = load()
        return engine


def generate(
    prompts: str | Iterable[str], *, progress: bool = False, **params: Any
) -> list[Result]:
    """Generate with the kernel's engine, loading the bundled model first if none is loaded.

    Any number of prompts: they are fed into the engine's queue as it drains,
    results come back in input order. ``progress=True`` shows a progress bar (a
    live display in a notebook, a line on stderr elsewhere). Ctrl-C cancels what
    has not finished; the ``KeyboardInterrupt`` carries ``.results``, every
    prompt's ``Result`` so far (``sys.last_value.results`` after an interrupted cell).
    """
    return _engine_or_default().generate(prompts, progress=progress, **params)


async def agenerate(
    prompts: str | Iterable[str], *, progress: bool = False, **params: Any
) -> list[Result]:
    """``generate`` for event loops; cancelling the task cancels what has not finished."""
    return await _engine_or_default().agenerate(prompts, progress=progress, **params)
