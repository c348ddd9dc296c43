"""nbollama: a Jupyter-native LLM engine.

One GGUF model in the kernel, N parallel slots with continuous batching, and
views that show what the engine does. In a notebook::

    %load_ext nbollama
    %%generate --max-tokens 64
    Explain continuous batching in one sentence.
    ---
    Write a haiku about GPUs.

From Python::

    from nbollama import Engine
    with Engine.load(parallel=4, ctx=1024) as engine:
        for result in engine.generate(["Hi!", "Name a colour."], max_tokens=32):
            print(result.text)
"""

from __future__ import annotations

from typing import Any

from . import store
from .engine import Engine, Handle, Result, SamplingParams, Subscription
from .exceptions import (
    ContextError,
    EngineClosedError,
    EngineError,
    InvalidParamsError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    NbollamaError,
    PromptTooLongError,
    QueueFullError,
    RemoteError,
    RequestError,
    RequestFailedError,
    RequestTimeoutError,
)
from .session import (
    agenerate,
    connect,
    current_engine,
    disconnect,
    engines,
    generate,
    load,
    on_engine_change,
    set_engine,
    unload,
    use,
)

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "Handle",
    "Result",
    "SamplingParams",
    "Subscription",
    "current_engine",
    "engines",
    "use",
    "set_engine",
    "load",
    "unload",
    "connect",
    "disconnect",
    "on_engine_change",
    "generate",
    "agenerate",
    "dashboard",
    "store",
    "load_ipython_extension",
    "unload_ipython_extension",
    "NbollamaError",
    "ModelError",
    "ModelNotFoundError",
    "ModelLoadError",
    "EngineError",
    "EngineClosedError",
    "ContextError",
    "RemoteError",
    "RequestError",
    "QueueFullError",
    "PromptTooLongError",
    "InvalidParamsError",
    "RequestFailedError",
    "RequestTimeoutError",
    "__version__",
]


def dashboard(engine: Engine | None = None, *, compact: bool = False) -> Any:
    """A live dashboard of the engine (``nbollama.widgets.dashboard``); imported lazily,
    so ``import nbollama`` does not pull in ipywidgets and plotly."""
    from .widgets import dashboard as _dashboard

    return _dashboard(engine, compact=compact)


def _offer_to_panel(engine: Any) -> None:
    """In a Jupyter kernel, let the side panel find an engine even without ``%load_ext nbollama``.

    Hooked here, at the top of the package, so that ``session`` imports no view."""
    if engine is not None:
        from .comm import register_in_kernel

        register_in_kernel()


on_engine_change(_offer_to_panel)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "nbollama"}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbollama``: the magics and the side panel's comm target."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbollama``: close the engine, remove the magics and the comm target."""
    from .magics import unload_ipython_extension as unload_

    unload_(ipython)
