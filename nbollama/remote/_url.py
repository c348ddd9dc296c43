"""Where a server is, and what of that may be shown: URLs checked, credentials redacted, keys from the environment.

Credentials never leave this module in plain text: a URL's ``user:password@``
becomes HTTP basic auth, a key comes from an environment variable and goes
into a header, and everything shown (load line, snapshots, errors, logs)
uses ``Endpoint.shown``, where the password and any key-like query value are
``***``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from ..exceptions import InvalidParamsError

__all__ = ["Endpoint", "parse_url", "redact_url", "api_key_from_env", "host_is_local", "scrub"]

#: Query parameters whose values are secrets (matched as substrings, case-insensitive).
_SECRET_QUERY = ("key", "token", "secret", "password", "passwd", "auth", "signature", "sig", "credential")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_URL_IN_TEXT = re.compile(r"\bhttps?://[^\s'\"<>]+")
REDACTED = "***"


@dataclass(frozen=True)
class Endpoint:
    """A checked server address: ``base`` to send to, ``shown`` to show, credentials apart."""

    base: str  # scheme://host[:port][/prefix], no credentials, no query, no trailing slash
    shown: str  # what views and messages print: the URL with every secret redacted
    scheme: str
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    params: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def auth(self) -> tuple[str, str] | None:
        if self.username is None:
            return None
        return (self.username, self.password or "")

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret this endpoint carries, to scrub from any text before it is shown."""
        found = [self.password] if self.password else []
        found += [value for name, value in self.params if _is_secret(name) and value]
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
    password = unquote(parts.password) if parts.password is not None else None
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


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with URLs redacted and every known secret value replaced by ``***``."""
    text = redact_url(text)
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, REDACTED)
    return text


def check_env_name(name: str) -> str:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise InvalidParamsError(f"api_key_env={name!r}: not an environment variable name")
    return name


def api_key_from_env(name: str) -> str:
    """The API key held by environment variable ``name``; the value is never shown.

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
    return value.strip()


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
