"""Remote engines: the same cells, views and sweep on a llama-server, Ollama, vLLM or OpenAI-compatible server.

::

    import nbollama
    engine = nbollama.connect("http://gpu-box:11434")          # kind detected from the server's endpoints
    engine = nbollama.connect("https://api.example.com/v1", kind="openai", model="m", api_key_env="EXAMPLE_KEY")

``connect`` checks its arguments, finds what serves at the URL and returns a
``RemoteEngine`` (``nbollama.connect`` also makes it the kernel's engine).
API keys come from an environment variable only and are never shown;
credentials in URLs are redacted wherever the URL is shown. Objects hold
both as ``Secret`` (``repr``/``str`` ``***``, never pickled), revealed only
as a request is sent.
"""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

from ..exceptions import InvalidParamsError
from ._detect import KINDS, ServerInfo, detect
from ._engine import BUSY_RETRIES, DEFAULT_MAX_INFLIGHT, RemoteEngine, RemoteHandle
from ._http import Connection
from ._url import (
    Endpoint,
    Secret,
    api_key_from_env,
    check_env_name,
    host_is_local,
    parse_url,
    redact_url,
)

__all__ = [
    "KINDS",
    "DEFAULT_MAX_INFLIGHT",
    "BUSY_RETRIES",
    "RemoteEngine",
    "RemoteHandle",
    "ServerInfo",
    "Endpoint",
    "Secret",
    "ConnectOptions",
    "check_connect",
    "connect",
    "detect",
    "parse_url",
    "redact_url",
    "host_is_local",
]

#: Seconds a stream may stay silent before its request fails (a server may queue or load a model).
DEFAULT_TIMEOUT = 300.0


class ConnectOptions:
    """``connect``'s arguments, checked before any network call: a bad one is an ``InvalidParamsError``."""

    def __init__(
        self,
        url: str,
        *,
        kind: str = "auto",
        model: str | None = None,
        api_key_env: str | None = None,
        max_inflight: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ca_bundle: str | None = None,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        self.endpoint = parse_url(url)
        if kind not in KINDS:
            raise InvalidParamsError(f"kind={kind!r}: one of {', '.join(KINDS)}")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise InvalidParamsError(f"model={model!r}: a model name")
        if max_inflight is not None and (
            not isinstance(max_inflight, int) or isinstance(max_inflight, bool) or max_inflight < 1
        ):
            raise InvalidParamsError(f"max_inflight={max_inflight!r}: must be a whole number >= 1")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise InvalidParamsError(f"timeout={timeout!r}: seconds, > 0")
        if ca_bundle is not None and not Path(ca_bundle).expanduser().is_file():
            raise InvalidParamsError(f"ca_bundle={ca_bundle!r}: no such file")
        self.api_key_env = check_env_name(api_key_env) if api_key_env is not None else None
        self.api_key: Secret | None = api_key_from_env(api_key_env) if api_key_env is not None else None
        self.kind = kind
        self.model = model.strip() if model else None
        self.max_inflight = max_inflight
        self.timeout = float(timeout)
        verify_value: bool | str | ssl.SSLContext = verify
        if ca_bundle is not None:
            verify_value = str(Path(ca_bundle).expanduser())
        self.connection = Connection(endpoint=self.endpoint, api_key=self.api_key, verify=verify_value, timeout=self.timeout)

    def __repr__(self) -> str:  # never the key
        key = f" api_key_env={self.api_key_env}" if self.api_key_env else ""
        return f"<ConnectOptions {self.endpoint.shown} kind={self.kind}{key}>"


def check_connect(url: str, **options: Any) -> ConnectOptions:
    """Check ``connect``'s arguments without touching the network."""
    return ConnectOptions(url, **options)  # ConnectOptions checks every value


def open_remote(options: ConnectOptions) -> RemoteEngine:
    """Detect the server and open a ``RemoteEngine`` on it (raises ``RemoteError`` if it cannot)."""
    started = time.perf_counter()
    info = detect(options.connection, kind=options.kind, model=options.model)
    return RemoteEngine(
        options.connection,
        info,
        max_inflight=options.max_inflight,
        connect_seconds=time.perf_counter() - started,
    )


def connect(
    url: str,
    *,
    kind: str = "auto",
    model: str | None = None,
    api_key_env: str | None = None,
    max_inflight: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    ca_bundle: str | None = None,
    verify: bool | ssl.SSLContext = True,
) -> RemoteEngine:
    """A ``RemoteEngine`` on the server at ``url`` (not made the kernel's engine; ``nbollama.connect`` does that).

    ``kind``: "auto" (detected), "llama-server", "ollama", "vllm" or "openai".
    ``model``: which model to use where the server has several. ``api_key_env``:
    the name of the environment variable holding the API key (sent as a
    Bearer token). ``max_inflight``: requests open at once (default: the
    server's slot count when it says, else 4); the rest wait in nbollama's
    queue. ``timeout``: seconds a stream may stay silent. ``ca_bundle``: a CA
    file for https with a private CA.
    """
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
    # A verbose traceback (%xmode Verbose) prints this frame's arguments: from here on the URL is
    # the redacted one, its password and key-like query values held by the connection as Secrets.
    url = options.endpoint.shown
    return open_remote(options)
