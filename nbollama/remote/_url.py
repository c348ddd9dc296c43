"""Where a server is, and what of that may be shown: URLs checked, credentials redacted, keys from the environment.

Credentials never leave this module in plain text: a URL's ``user:password@``
becomes HTTP basic auth, a key comes from an environment variable and goes
into a header, and everything shown (load line, snapshots, errors, logs)
uses ``Endpoint.shown``, where the password and any key-like query value are
``***``.

Every credential an object holds (the API key, a URL's password, a key-like
query value) is a ``Secret``: its ``repr``, ``str`` and format are ``***``,
it cannot be pickled, and only ``Secret.reveal()`` gives the value, which
``_http`` calls at the one place it goes on the wire. So ``repr``/``vars`` of
a connection, a dataclass repr, a snapshot, or a verbose traceback that
prints locals, never shows a key.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from ..exceptions import InvalidParamsError

__all__ = ["Secret", "Endpoint", "parse_url", "redact_url", "api_key_from_env", "host_is_local", "scrub"]

#: Query parameters whose values are secrets (matched as substrings, case-insensitive).
_SECRET_QUERY = ("key", "token", "secret", "password", "passwd", "auth", "signature", "sig", "credential")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_URL_IN_TEXT = re.compile(r"\bhttps?://[^\s'\"<>]+")
REDACTED = "***"


class Secret:
    """A credential (an API key, a password) that no way of showing an object shows.

    ``repr`` is ``Secret('***')``, ``str`` and any format (f-strings) are
    ``***``; ``vars()`` has nothing to show (``__slots__``). ``reveal()``
    gives the value, for the one place that puts it on the wire.

    Pickling raises ``TypeError``: a pickle would carry the key in clear into
    a file or another process, and a redacted one would fail later at the
    server with a puzzling 401. ``copy``/``deepcopy`` give the same object (it
    is immutable), so ``dataclasses.replace``/``asdict`` keep working.

    Equal to another ``Secret`` with the same value (compared in constant
    time), never to a plain string; hashable; true when not empty.
    """

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str | Secret) -> None:
        if isinstance(value, Secret):
            value = value.reveal()
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        """The value in clear: only to send it (a header, basic auth, a query)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return format(REDACTED, spec)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("a Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("a Secret is immutable")

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError(
            "a Secret (an API key or password) cannot be pickled: the pickle would carry it in clear; "
            "connect again where it is needed (the key comes from the environment there)"
        )

    def __reduce__(self) -> NoReturn:
        self.__reduce_ex__(None)

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


def reveal(value: str | Secret | None) -> str | None:
    """The clear value of a ``Secret`` (a plain string or ``None`` as it is)."""
    return value.reveal() if isinstance(value, Secret) else value


@dataclass(frozen=True)
class Endpoint:
    """A checked server address: ``base`` to send to, ``shown`` to show, credentials apart."""

    base: str  # scheme://host[:port][/prefix], no credentials, no query, no trailing slash
    shown: str  # what views and messages print: the URL with every secret redacted
    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: Secret | None = field(default=None, repr=False)
    #: The URL's query, sent with every request; key-like values (``?api_key=``) are ``Secret``.
    params: tuple[tuple[str, str | Secret], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.password, str):
            object.__setattr__(self, "password", Secret(self.password))
        params = tuple(
            (name, Secret(value) if isinstance(value, str) and _is_secret(name) else value)
            for name, value in self.params
        )
        object.__setattr__(self, "params", params)

    @property
    def auth(self) -> tuple[str, str] | None:
        """HTTP basic auth ``(user, password)`` in clear, computed when asked (never stored so)."""
        if self.username is None:
            return None
        return (self.username, reveal(self.password) or "")

    def query(self) -> list[tuple[str, str]]:
        """The query parameters in clear, to send."""
        return [(name, reveal(value) or "") for name, value in self.params]

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Every secret this endpoint carries, to scrub from any text before it is shown."""
        found = [self.password] if self.password else []
        found += [value for _, value in self.params if isinstance(value, Secret) and value]
        return tuple(found)

    def __str__(self) -> str:
        return self.shown


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_QUERY)


def parse_url(text: str) -> Endpoint:
    """Check a server URL; ``host:port`` alone means ``http://host:port``.

    Raises ``InvalidParamsError`` (with the URL redacted) for anything that is
    not an http(s) URL with a host. A trailing ``/v1`` (as OpenAI clients are
    given) is dropped: nbollama adds the API paths itself.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidParamsError("the server URL is empty")
    raw = text.strip()
    if "://" not in raw:
        raw = "http://" + raw
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise InvalidParamsError(f"{redact_url(text)}: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidParamsError(
            f"{redact_url(text)}: the scheme must be http or https, not {parts.scheme!r}"
        )
    host = parts.hostname
    if not host:
        raise InvalidParamsError(f"{redact_url(text)}: no host in the URL")
    if parts.fragment:
        raise InvalidParamsError(f"{redact_url(text)}: a server URL has no #fragment")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    netloc_host = f"[{host}]" if ":" in host else host
    netloc = netloc_host if parts.port is None else f"{netloc_host}:{parts.port}"
    base = urlunsplit((parts.scheme, netloc, path, "", ""))
    params = tuple(parse_qsl(parts.query, keep_blank_values=True))
    username = unquote(parts.username) if parts.username is not None else None
    password = Secret(unquote(parts.password)) if parts.password is not None else None
    shown_netloc = netloc
    if username is not None:
        shown_netloc = f"{quote(username, safe='')}{':' + REDACTED if password else ''}@{netloc}"
    query = "&".join(f"{name}={REDACTED if _is_secret(name) else value}" for name, value in params)
    shown = urlunsplit((parts.scheme, shown_netloc, path, query, ""))
    return Endpoint(
        base=base,
        shown=shown,
        scheme=parts.scheme,
        host=host,
        port=port,
        username=username,
        password=password,
        params=params,
    )


def redact_url(text: str) -> str:
    """Any text with the credentials of every URL in it replaced by ``***``."""

    def one(match: re.Match[str]) -> str:
        url = match.group(0)
        try:
            parts = urlsplit(url)
        except ValueError:
            return url
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{REDACTED}@{hostport}" if ":" in userinfo else f"{user}@{hostport}"
        query = parts.query
        if query:
            query = "&".join(
                f"{name}={REDACTED if _is_secret(name) else value}"
                for name, value in parse_qsl(query, keep_blank_values=True)
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    return _URL_IN_TEXT.sub(one, text)


def scrub(text: str, secrets: Iterable[str | Secret]) -> str:
    """``text`` with URLs redacted and every known secret value replaced by ``***``."""
    text = redact_url(text)
    for secret in secrets:
        value = reveal(secret)
        if value and len(value) >= 3:
            text = text.replace(value, REDACTED)
    return text


def check_env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise InvalidParamsError(f"api_key_env={name!r}: not an environment variable name")
    return name


def api_key_from_env(name: str) -> Secret:
    """The API key held by environment variable ``name``, as a ``Secret``: the value is never shown.

    Raises ``InvalidParamsError`` naming the variable (not its value) when it
    is not set or empty.
    """
    check_env_name(name)
    value = os.environ.get(name, "")
    if not value.strip():
        raise InvalidParamsError(
            f"the environment variable {name} is not set (or empty): put the API key there, "
            f"e.g. in the shell that starts Jupyter (export {name}=...), never in the notebook"
        )
    return Secret(value.strip())


def _local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                try:
                    found.add(ipaddress.ip_address(address.address.split("%", 1)[0]))
                except ValueError:
                    continue
    except Exception:
        pass
    return found


def host_is_local(host: str) -> bool:
    """Whether ``host`` is this machine (loopback, its own name, or one of its addresses)."""
    name = host.strip("[]").lower()
    if name in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        own = {socket.gethostname().lower(), socket.getfqdn().lower()}
    except OSError:
        own = set()
    if name in own:
        return True
    try:
        candidates = {ipaddress.ip_address(name)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(name, None)
        except OSError:
            return False
        candidates = set()
        for info in infos:
            try:
                candidates.add(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
            except ValueError:
                continue
    if any(address.is_loopback for address in candidates):
        return True
    return bool(candidates & _local_addresses())
