"""HTTP through httpx: clients with the endpoint's auth and timeouts, and failures in plain words.

Two kinds of client per remote engine: a sync ``httpx.Client`` for detection
and state polling (short timeouts), and an ``httpx.AsyncClient`` on the
engine's event-loop thread for the streams (a long read timeout: a server may
be silent while it queues a request or loads a model).

llama-server closes a connection after a streamed response, and a client
that reuses it gets "Server disconnected without sending a response". So
streams are sent with ``Connection: close`` (one connection each, never
reused), and idempotent GETs are retried once when a pooled connection turns
out to be dead.

Credentials stay ``Secret`` (see ``_url``) in every object, the httpx
clients included: they are handed a ``Credentials`` auth that reveals the
key, the basic-auth password and the URL's query only into each request as
it is sent, so no client, connection or engine attribute holds them in
clear.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import httpx

from ._url import Endpoint, Secret, scrub

__all__ = [
    "Connection",
    "Credentials",
    "describe",
    "error_message",
    "get",
    "STREAM_HEADERS",
]

#: Sent with every streamed request (see the module doc).
STREAM_HEADERS = {"Connection": "close", "Accept": "text/event-stream, application/x-ndjson"}


def _user_agent() -> str:
    try:
        import importlib.metadata

        return f"nbollama/{importlib.metadata.version('nbollama')}"
    except Exception:
        return "nbollama"


class Credentials(httpx.Auth):
    """What a request carries to be let in: the Bearer key, basic auth, the URL's query.

    Put on each request as it is sent, from the ``Secret`` values, so that the
    httpx client holds no credential in clear (its default headers and params
    would). On the wire it is what httpx did with ``headers={"Authorization":
    "Bearer KEY"}``, ``auth=(user, password)`` and ``params=query`` given to
    the client: the key as ``Authorization: Bearer``, replaced by ``Basic``
    when the URL has ``user:password@`` (httpx's basic auth set the header
    after the client's), the URL's query first and a request's own
    parameters over it.
    """

    def __init__(self, endpoint: Endpoint, api_key: Secret | None) -> None:
        self._endpoint = endpoint
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"<Credentials for {self._endpoint.shown}{' with an API key' if self._api_key else ''}>"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._api_key:
            request.headers["Authorization"] = f"Bearer {self._api_key.reveal()}"
        basic = self._endpoint.auth
        if basic is not None:
            pair = f"{basic[0]}:{basic[1]}".encode()  # as httpx.BasicAuth: utf-8
            request.headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        query = self._endpoint.query()
        if query:
            params = httpx.QueryParams(tuple(query))  # tuple: httpx's list type is invariant
            request.url = request.url.copy_with(params=params.merge(request.url.params))
        yield request


@dataclass(frozen=True)
class Connection:
    """How to talk to one server: where, with which credentials, how patiently.

    ``api_key`` is a ``Secret`` (a plain string given is made one): ``repr``,
    ``vars``, ``dataclasses.asdict`` show ``Secret('***')``; pickling raises.
    """

    endpoint: Endpoint
    api_key: Secret | None = None
    verify: bool | str | ssl.SSLContext = True
    timeout: float = 300.0  # seconds a stream may stay silent
    connect_timeout: float = 5.0
    poll_timeout: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.api_key, str):
            object.__setattr__(self, "api_key", Secret(self.api_key) if self.api_key else None)
        elif self.api_key is not None and not isinstance(self.api_key, Secret):
            raise TypeError(f"api_key: a Secret or a str, not {type(self.api_key).__name__}")

    @property
    def url(self) -> str:
        """The URL as it may be shown (credentials redacted)."""
        return self.endpoint.shown

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Every credential of this connection, to scrub from text before it is shown."""
        found = self.endpoint.secrets
        return (*found, self.api_key) if self.api_key else found

    def scrub(self, text: str) -> str:
        """``text`` (a server's error message, say) with URLs redacted and this connection's secrets ``***``."""
        return scrub(text, self.secrets)

    def _ssl(self) -> bool | ssl.SSLContext:
        if isinstance(self.verify, str):
            return ssl.create_default_context(cafile=self.verify)
        return self.verify

    def _options(self, timeout: httpx.Timeout) -> dict[str, Any]:
        return {
            "base_url": self.endpoint.base,
            "headers": {"User-Agent": _user_agent()},
            "auth": Credentials(self.endpoint, self.api_key),
            "verify": self._ssl(),
            "timeout": timeout,
            "follow_redirects": False,
        }

    def sync_client(self) -> httpx.Client:
        """For detection and polling: quick to give up."""
        timeout = httpx.Timeout(self.poll_timeout, connect=self.connect_timeout)
        return httpx.Client(**self._options(timeout))

    def async_client(self, max_connections: int) -> httpx.AsyncClient:
        """For streams: ``timeout`` seconds of silence before a request fails."""
        timeout = httpx.Timeout(self.timeout, connect=self.connect_timeout, pool=None)
        limits = httpx.Limits(max_connections=max_connections + 4, max_keepalive_connections=4)
        return httpx.AsyncClient(limits=limits, **self._options(timeout))

    def describe(self, exc: BaseException) -> str:
        return describe(exc, self)


def describe(exc: BaseException, connection: Connection | None = None) -> str:
    """What went wrong, in words, without any secret in it."""
    timeout = connection.timeout if connection is not None else None
    connect_timeout = connection.connect_timeout if connection is not None else None
    text = str(exc) or type(exc).__name__
    lowered = " ".join(str(e).lower() for e in _chain(exc))
    if isinstance(exc, httpx.ConnectTimeout):
        reason = f"no answer within {connect_timeout:g} s (connect timeout)" if connect_timeout else "connect timeout"
    elif isinstance(exc, httpx.ReadTimeout):
        reason = (
            f"the server sent nothing for {timeout:g} s (read timeout)" if timeout else "read timeout"
        )
    elif isinstance(exc, httpx.TimeoutException):
        reason = f"timed out ({type(exc).__name__})"
    elif isinstance(exc, httpx.ConnectError):
        if "refused" in lowered or any(isinstance(e, ConnectionRefusedError) for e in _chain(exc)):
            reason = "connection refused (is the server running, and on this port?)"
        elif "certificate" in lowered or "ssl" in lowered or "tls" in lowered:
            reason = f"TLS failed: {text} (for a private CA, pass ca_bundle= / --ca-bundle PATH)"
        elif "name or service not known" in lowered or "nodename nor servname" in lowered or "getaddrinfo" in lowered:
            reason = f"cannot resolve the host name ({text})"
        else:
            reason = f"cannot connect: {text}"
    elif isinstance(exc, httpx.RemoteProtocolError):
        reason = f"the server closed the connection mid-response (stopped or crashed?): {text}"
    elif isinstance(exc, httpx.ReadError):
        reason = f"the connection broke: {text}"
    elif isinstance(exc, httpx.HTTPError):
        reason = f"{type(exc).__name__}: {text}"
    else:
        reason = f"{type(exc).__name__}: {text}"
    return scrub(reason, connection.secrets if connection is not None else ())


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes (httpx wraps the socket's own error)."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found and len(found) < 8:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def error_message(response: httpx.Response, body: bytes | None = None) -> str:
    """The server's own error text from an error response (JSON ``error``/``detail``, or the body)."""
    raw = body if body is not None else response.content
    message = ""
    try:
        import json

        data = json.loads(raw)
    except Exception:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            message = str(error.get("message") or error)
        elif error is not None:
            message = str(error)
    if not message:
        message = raw.decode("utf-8", "replace").strip()
    message = " ".join(message.split())
    if len(message) > 400:
        message = message[:399] + "…"
    reason = response.reason_phrase or ""
    return f"HTTP {response.status_code}{' ' + reason if reason else ''}" + (f": {message}" if message else "")


def get(client: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    """GET, retried once if a pooled connection had been closed by the server."""
    try:
        return client.get(path, **kwargs)
    except httpx.RemoteProtocolError:
        return client.get(path, **kwargs)
