"""The kernel's engines: the ones the magics, the dashboard and the side panel all look at.

A kernel holds any number of named engines and one default. ``load`` and
``connect`` without a name replace the default, as they always did: the old
engine's requests are cancelled and its memory freed before the new one
loads. ``name=`` adds (or replaces) one engine beside the others; ``use``
switches the default. Two local engines from the same GGUF share one copy of
the weights. Views follow the default through ``on_engine_change`` and the
whole set through ``on_engines_change``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from ._api.kvcache import KV_BYTES_PER_VALUE
from ._api.protocol import EngineLike
from ._api.requests import Result
from ._core._config import LoadOptions
from ._core._engine import Engine
from ._core._llama import supports_gpu_offload
from ._logging import logger
from .exceptions import InvalidParamsError, ModelLoadError
from .memory import format_bytes, free_memory
from .models import GGUFHeader, same_file
from .sources import locate

if TYPE_CHECKING:
    import ssl

    from .remote import RemoteEngine

__all__ = [
    "DEFAULT_NAME",
    "current_engine",
    "current_name",
    "engines",
    "engine_named",
    "set_engine",
    "use",
    "load",
    "unload",
    "connect",
    "disconnect",
    "on_engine_change",
    "on_engines_change",
    "generate",
    "agenerate",
]

#: The name of an engine loaded or connected without ``name=``.
DEFAULT_NAME = "default"

_lock = threading.RLock()
_engines: dict[str, EngineLike] = {}  # in the order they came
_default: str | None = None
_listeners: list[Callable[[EngineLike | None], object]] = []
_set_listeners: list[Callable[[dict[str, EngineLike]], object]] = []


def engines() -> dict[str, EngineLike]:
    """The open engines by name, in the order they were loaded or connected."""
    with _lock:
        return {name: e for name, e in _engines.items() if not e.closed}


def current_name() -> str | None:
    """The default engine's name, or None when there is none."""
    with _lock:
        engine = _engines.get(_default) if _default is not None else None
        return _default if engine is not None and not engine.closed else None


def current_engine() -> EngineLike | None:
    """The kernel's default engine, or None when none is loaded (or it was closed)."""
    name = current_name()
    return _engines.get(name) if name is not None else None


def engine_named(name: str | None) -> EngineLike:
    """The engine called ``name`` (None: the default); a one-line error listing the names otherwise."""
    if name is None:
        engine = current_engine()
        if engine is None:
            raise InvalidParamsError("no engine is loaded: %nbollama load (or nbollama.load()) first")
        return engine
    found = engines().get(name)
    if found is None:
        names = ", ".join(engines()) or "none"
        raise InvalidParamsError(f"no engine named {name!r}; loaded: {names}")
    return found


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or any(c in name for c in ", \t\n"):
        raise InvalidParamsError(
            f"engine name {name!r}: give a non-empty name without spaces or commas (e.g. 'small')"
        )
    return name


def set_engine(
    engine: EngineLike | None, *, close_previous: bool = True, name: str | None = None
) -> None:
    """Make ``engine`` the engine called ``name`` (None: the default) and tell the views.

    ``None`` removes that engine (closing it unless ``close_previous=False``);
    when it was the default, the earliest other engine becomes the default.
    """
    global _default
    with _lock:
        target = _check_name(name) if name is not None else (_default or DEFAULT_NAME)
        before = current_engine()
        previous = _engines.get(target)
        # closed first: if closing fails (say, from an engine's own thread) nothing changes
        if close_previous and previous is not None and previous is not engine:
            previous.close()
        if engine is None:
            _engines.pop(target, None)
            if _default == target:
                _default = next((n for n, e in _engines.items() if not e.closed), None)
        else:
            engine.name = target
            _engines[target] = engine
            if _default is None or _default == target or current_engine() is None:
                _default = target
        after = current_engine()
        everyone = engines()
    _tell(before, after, everyone)


def use(name: str) -> EngineLike:
    """Make the engine called ``name`` the default: cells, ``generate`` and the views follow it."""
    global _default
    with _lock:
        engine = engine_named(_check_name(name))
        before = current_engine()
        _default = name
        everyone = engines()
    _tell(before, engine, everyone)
    return engine


def _tell(before: EngineLike | None, after: EngineLike | None, everyone: dict[str, EngineLike]) -> None:
    with _lock:
        listeners = list(_listeners) if after is not before else []
        set_listeners = list(_set_listeners)
    for listener in listeners:
        try:
            listener(after)
        except Exception:
            logger.warning("nbollama: an engine-change listener failed", exc_info=True)
    for set_listener in set_listeners:
        try:
            set_listener(everyone)
        except Exception:
            logger.warning("nbollama: an engines listener failed", exc_info=True)


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    parallel: int | Literal["auto", "adaptive"] = "auto",
    download: bool = False,
    **options: Any,
) -> Engine:
    """Load a model as the engine called ``name`` (None: the default), replacing the one of that name.

    ``model`` is a path, ``"default"``/None (the bundled model), an Ollama
    name (``gemma3:270m``) or a Hugging Face cache entry
    (``hf:ORG/REPO/FILE.gguf``; ``download=True`` fetches it when missing).
    Arguments, the file and whether it fits next to the other engines are
    checked before the engine it replaces is closed, so a typo leaves a
    working engine in place. A file another engine already holds is not read
    again: the two share its weights.
    """
    target = _check_name(name) if name is not None else None
    checked = LoadOptions.check(parallel=parallel, **options)
    header = locate(model, download=download)  # resolved once, read once: what follows is given it
    path = header.path
    with _lock:
        replacing = target or _default or DEFAULT_NAME
        others = {n: e for n, e in engines().items() if n != replacing}
    layers = checked.layers(supports_gpu_offload())
    donor = next(
        (
            e
            for e in others.values()
            if isinstance(e, Engine) and same_file(e.model_path, path) and e.gpu_layers == layers
        ),
        None,
    )
    _check_fits(header, checked, layers, shared=donor is not None, others=others)
    set_engine(None, name=replacing)
    engine = Engine.load(header, parallel=parallel, share_weights_with=donor, **options)
    set_engine(engine, name=replacing)
    return engine


def _check_fits(
    header: GGUFHeader, options: LoadOptions, layers: int, *, shared: bool, others: dict[str, EngineLike]
) -> None:
    """Refuse, before loading, a model whose weights and KV cache would not fit in what is free."""
    path = header.path
    meta, arch = header.metadata, header.architecture

    def number(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    n_head = number("attention.head_count", 1) or 1
    head_dim = number("embedding_length") // n_head
    per_value = KV_BYTES_PER_VALUE
    type_v = options.kv_type_v or options.kv_type
    per_token = (
        number("block_count")
        * (number("attention.head_count_kv", n_head) or n_head)
        * (
            number("attention.key_length", head_dim) * per_value[options.kv_type]
            + number("attention.value_length", head_dim) * per_value[type_v]
        )
    )
    slots = options.parallel if isinstance(options.parallel, int) else 1
    if options.parallel == "adaptive":
        slots = options.max_parallel or 1
    kv = int(per_token * options.ctx * slots)
    weights = 0 if shared else header.file_size
    need = weights + kv
    free, where = free_memory(layers != 0)
    if need <= free:
        return
    held = ", ".join(f"{n} ({format_bytes(_held_bytes(e))})" for n, e in others.items()) or "none"
    raise ModelLoadError(
        str(path),
        f"would not fit: it needs about {format_bytes(need)} (weights {format_bytes(weights)}"
        f"{', shared' if shared else ''}, KV {format_bytes(kv)} for {slots} x {options.ctx} tokens) and "
        f"{where} is {format_bytes(free)}; engines loaded: {held}. Unload one (%nbollama unload NAME), "
        "or ask for fewer slots, a smaller ctx or kv_type='q8_0'",
    )


def _held_bytes(engine: EngineLike) -> int:
    """What a local engine holds: its KV cache and its share of the weights (remote: 0)."""
    if not isinstance(engine, Engine):
        return 0
    return engine.kv_bytes + (engine.snapshot()["model"]["size_bytes"] or 0)


def unload(name: str | None = None) -> bool:
    """Close the engine called ``name`` (None: the default); False if there was none."""
    if name is not None:
        if _check_name(name) not in engines():
            return False
        set_engine(None, name=name)
        return True
    had = current_engine() is not None
    set_engine(None)
    return had


def connect(
    url: str,
    *,
    name: str | None = None,
    kind: str = "auto",
    model: str | None = None,
    api_key_env: str | None = None,
    max_inflight: int | None = None,
    timeout: float = 300.0,
    ca_bundle: str | None = None,
    verify: bool | ssl.SSLContext = True,
) -> RemoteEngine:
    """Make the server at ``url`` the engine called ``name`` (None: the default).

    Servers: llama-server, Ollama, vLLM, OpenAI-compatible. The arguments are
    checked and the server is found (``kind="auto"``: from its own endpoints)
    before the engine of that name is closed, so a wrong URL or an
    unreachable server leaves the working engine in place. The API key, if
    any, comes from the environment variable named by ``api_key_env``.
    ``load`` switches back to an in-kernel engine. See ``nbollama.remote.connect``.
    """
    from .remote import ConnectOptions, open_remote

    target = _check_name(name) if name is not None else None
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
        set_engine(engine, name=target)
    except BaseException:
        engine.close()
        raise
    logger.info(engine.summary)
    return engine


def disconnect(name: str | None = None) -> bool:
    """Close an engine, as ``unload`` does; a remote server keeps running. False if there was none."""
    return unload(name)


def on_engine_change(listener: Callable[[EngineLike | None], object]) -> Callable[[], None]:
    """Call ``listener(engine_or_None)`` whenever the kernel's default engine changes; returns the unsubscriber."""
    return _subscribe(_listeners, listener)


def on_engines_change(listener: Callable[[dict[str, EngineLike]], object]) -> Callable[[], None]:
    """Call ``listener(engines_by_name)`` whenever an engine is added, removed or made the default."""
    return _subscribe(_set_listeners, listener)


def _subscribe(listeners: list[Any], listener: Any) -> Callable[[], None]:
    with _lock:
        listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in listeners:
                listeners.remove(listener)

    return unsubscribe


def _engine_or_default(name: str | None) -> EngineLike:
    if name is not None:
        return engine_named(name)
    with _lock:
        engine = current_engine()
        if engine is None:
            engine = load()
        return engine


def generate(
    prompts: str | Iterable[str],
    *,
    progress: bool = False,
    engine: str | None = None,
    **params: Any,
) -> list[Result]:
    """Generate with the kernel's default engine (or the one called ``engine``), loading the bundled model first if none is loaded.

    Any number of prompts: they are fed into the engine's queue as it drains,
    results come back in input order. ``progress=True`` shows a progress bar (a
    live display in a notebook, a line on stderr elsewhere). Ctrl-C cancels what
    has not finished; the ``KeyboardInterrupt`` carries ``.results``, every
    prompt's ``Result`` so far (``sys.last_value.results`` after an interrupted cell).
    """
    return _engine_or_default(engine).generate(prompts, progress=progress, **params)


async def agenerate(
    prompts: str | Iterable[str],
    *,
    progress: bool = False,
    engine: str | None = None,
    **params: Any,
) -> list[Result]:
    """``generate`` for event loops; cancelling the task cancels what has not finished."""
    return await _engine_or_default(engine).agenerate(prompts, progress=progress, **params)
