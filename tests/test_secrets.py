"""A secret is never in a repr: API keys and URL credentials are ``Secret`` wherever an object holds them.

Unit tests of ``Secret`` (repr, str, format, pickle, copy, equality) and of the
objects that hold one (``Endpoint``, ``Connection``, ``ConnectOptions``, the
httpx auth), then end to end against ``remote_fakes`` servers on 127.0.0.1:
a key from an environment variable reaches the server in the Authorization
header, and none of repr, str, vars (walked), the summary, the snapshot, the
status report, the log or an IPython verbose traceback of a connected engine
shows it. The same for a URL's ``user:password@`` and ``?api_key=`` query.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import logging
import pickle
import socket
import sys
import threading
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from remote_fakes import Fake

from nbollama import session
from nbollama.exceptions import RemoteError
from nbollama.remote import RemoteEngine, Secret, check_connect, connect, parse_url
from nbollama.remote._http import Connection, Credentials
from nbollama.remote._url import api_key_from_env, scrub

KEY = "sk-test-SECRET-1234"
KEY_ENV = "NBOLLAMA_SECRETS_TEST_KEY"
PASSWORD = "pa55word-SECRET-9876"
QUERY_KEY = "q-SECRET-5678"
ALL_SECRETS = (KEY, PASSWORD, QUERY_KEY)


def leaks(text: str) -> list[str]:
    """The secrets that ``text`` shows (none, we hope)."""
    return [secret for secret in ALL_SECRETS if secret in text]


def assert_hidden(*texts: str) -> None:
    for text in texts:
        assert not leaks(text), f"a secret is shown in: {text[:2000]}"


def walk(root: object, *, depth: int = 5, limit: int = 20000) -> Iterator[tuple[str, object]]:
    """(path, value) of everything reachable from ``root`` through ``vars()`` of nbollama's own
    objects and through containers: what a variable inspector or a curious user would see."""
    seen: set[int] = set()
    stack: deque[tuple[str, object, int]] = deque([("root", root, 0)])
    while stack and len(seen) < limit:
        path, value, level = stack.popleft()
        if id(value) in seen:
            continue
        seen.add(id(value))
        yield path, value
        if level >= depth:
            continue
        if isinstance(value, dict):
            children = [(f"{path}[{k!r}]", v) for k, v in list(value.items())]
            children += [(f"{path}.keys()", k) for k in list(value)]
        elif isinstance(value, (list, tuple, set, frozenset, deque)):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(list(value))]
        elif type(value).__module__.startswith("nbollama") and hasattr(value, "__dict__"):
            children = [(f"{path}.{k}", v) for k, v in list(vars(value).items())]
        else:
            continue
        stack.extend((p, v, level + 1) for p, v in children)


def assert_nothing_reachable_shows_a_secret(root: object) -> int:
    count = 0
    for path, value in walk(root):
        count += 1
        if isinstance(value, str):
            assert not leaks(value), f"{path} holds a secret in clear"
            continue
        if isinstance(value, (int, float, bool, type(None), bytes)):
            continue
        assert not leaks(repr(value)), f"repr of {path} shows a secret"
        if type(value).__module__.startswith("nbollama"):
            assert not leaks(str(value)), f"str of {path} shows a secret"
    return count


def verbose_traceback(exc_info: tuple[Any, Any, Any]) -> str:
    """An IPython verbose traceback (``%xmode Verbose``: every frame with its variables), plain text."""
    from IPython.core import ultratb

    try:
        formatter = ultratb.VerboseTB(theme_name="nocolor")  # type: ignore[call-arg]  # IPython >= 9
    except TypeError:
        formatter = ultratb.VerboseTB(color_scheme="NoColor")  # type: ignore[call-arg]  # IPython 8
    return formatter.text(*exc_info)


def _fail_with(engine: object, connection: Connection) -> None:
    """Raise in a frame whose locals hold the engine, the connection and its secrets."""
    key = connection.api_key
    endpoint = connection.endpoint
    fields = vars(connection)
    raise RuntimeError(f"failed: {engine!r} {connection!r} {key!r} {endpoint.password!r} {fields!r} {key}")


# -- the Secret type -------------------------------------------------------------------------


def test_a_secret_shows_only_stars() -> None:
    secret = Secret(KEY)
    assert secret.reveal() == KEY
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret!s}",
        f"{secret:>30}",
        f"{secret}",
        "%s %r" % (secret, secret),  # noqa: UP031
        format(secret, ""),
        repr([secret]),
        repr({"key": secret}),
        repr((secret,)),
    ]
    assert_hidden(*shown)
    assert repr(secret) == "Secret('***')" and str(secret) == "***" and f"{secret}" == "***"
    with pytest.raises(TypeError):
        vars(secret)  # nothing to show: __slots__
    assert not hasattr(secret, "__dict__")
    with pytest.raises(AttributeError):
        secret._value = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del secret._value
    with pytest.raises(TypeError):
        Secret(1234)  # type: ignore[arg-type]


def test_a_secret_compares_by_value_and_is_true_when_not_empty() -> None:
    assert Secret(KEY) == Secret(KEY) and Secret(KEY) != Secret("other")
    assert Secret(KEY) != KEY  # never equal to the clear text
    assert hash(Secret(KEY)) == hash(Secret(KEY)) and len({Secret(KEY), Secret(KEY)}) == 1
    assert Secret(KEY) and not Secret("")
    assert Secret(Secret(KEY)).reveal() == KEY


def test_a_secret_is_never_pickled_but_copies_in_process() -> None:
    secret = Secret(KEY)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError, match="cannot be pickled") as info:
            pickle.dumps(secret, protocol=protocol)
        assert_hidden(str(info.value))
    assert copy.copy(secret) is secret and copy.deepcopy(secret) is secret
    assert copy.deepcopy({"k": secret})["k"].reveal() == KEY


def test_an_api_key_from_the_environment_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, f"  {KEY}\n")
    key = api_key_from_env(KEY_ENV)
    assert isinstance(key, Secret) and key.reveal() == KEY
    options = check_connect("http://127.0.0.1:9", api_key_env=KEY_ENV)
    assert isinstance(options.api_key, Secret)
    assert_hidden(repr(options), str(options), repr(vars(options)), repr(options.connection))
    assert_nothing_reachable_shows_a_secret(options)


def test_url_credentials_are_secrets_and_still_sent_in_clear() -> None:
    endpoint = parse_url(f"https://alice:{PASSWORD}@gpu.example.org:8443/v1?api_key={QUERY_KEY}&x=1")
    assert isinstance(endpoint.password, Secret) and endpoint.password.reveal() == PASSWORD
    assert endpoint.auth == ("alice", PASSWORD)
    assert endpoint.query() == [("api_key", QUERY_KEY), ("x", "1")]
    assert dict(endpoint.params)["x"] == "1" and isinstance(dict(endpoint.params)["api_key"], Secret)
    assert endpoint.shown == "https://alice:***@gpu.example.org:8443?api_key=***&x=1"
    assert_hidden(repr(endpoint), str(endpoint), repr(vars(endpoint)), repr(dataclasses.asdict(endpoint)))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(endpoint)
    assert pickle.loads(pickle.dumps(parse_url("http://h:1/?x=1"))) == parse_url("http://h:1/?x=1")
    assert set(endpoint.secrets) == {Secret(PASSWORD), Secret(QUERY_KEY)}
    text = f"GET https://alice:{PASSWORD}@h/?api_key={QUERY_KEY} failed; key {QUERY_KEY}, {PASSWORD}"
    assert_hidden(scrub(text, endpoint.secrets))


def test_a_connection_shows_no_secret() -> None:
    endpoint = parse_url(f"http://bob:{PASSWORD}@127.0.0.1:9/?token={QUERY_KEY}")
    connection = Connection(endpoint=endpoint, api_key=KEY)  # type: ignore[arg-type]  # a str is made a Secret
    assert isinstance(connection.api_key, Secret) and connection.api_key.reveal() == KEY
    assert connection.api_key  # truthy: the engine's "the API key was refused" hint reads it so
    assert Connection(endpoint=endpoint, api_key="").api_key is None  # type: ignore[arg-type]
    fields = vars(connection)
    assert fields["api_key"] == Secret(KEY)
    assert_hidden(
        repr(connection),
        str(connection),
        f"{connection}",
        repr(fields),
        repr(dataclasses.asdict(connection)),
        repr(dataclasses.astuple(connection)),
        repr(connection.describe),  # a bound method's repr is its object's: the poller holds one
        repr(connection.secrets),
    )
    assert dataclasses.replace(connection, timeout=1.0).api_key == Secret(KEY)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(connection)
    assert_hidden(connection.scrub(f"bad key {KEY} for http://bob:{PASSWORD}@h/ and {QUERY_KEY}"))


def test_the_clients_hold_no_credential_in_clear_and_send_them_as_before() -> None:
    endpoint = parse_url(f"http://127.0.0.1:9/v1?api_key={QUERY_KEY}&x=1")
    connection = Connection(endpoint=endpoint, api_key=Secret(KEY))
    with connection.sync_client() as client:
        assert "authorization" not in client.headers and not client.params
        assert isinstance(client.auth, Credentials)
        assert_hidden(repr(client.auth), repr(vars(client.auth)), repr(vars(client)), repr(dict(client.headers)))
        request = client.build_request("GET", "/props", params={"y": "2"})
        sent = next(client.auth.sync_auth_flow(request))
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.url.path == "/props" and list(sent.url.params.multi_items()) == [
        ("api_key", QUERY_KEY), ("x", "1"), ("y", "2"),
    ]
    # the URL's user:password@ is basic auth, and (as before) replaces the Bearer header
    basic = Connection(endpoint=parse_url(f"http://bob:{PASSWORD}@127.0.0.1:9"), api_key=Secret(KEY))
    request = httpx.Request("GET", "http://127.0.0.1:9/x")
    sent = next(Credentials(basic.endpoint, basic.api_key).sync_auth_flow(request))
    assert sent.headers["Authorization"] == "Basic " + base64.b64encode(f"bob:{PASSWORD}".encode()).decode()
    plain = next(Credentials(parse_url("http://127.0.0.1:9"), None).sync_auth_flow(httpx.Request("GET", "http://127.0.0.1:9/x")))
    assert "authorization" not in plain.headers and str(plain.url) == "http://127.0.0.1:9/x"


# -- end to end: a connected engine ------------------------------------------------------------


def _connection_of(engine: RemoteEngine) -> Connection:
    """The engine's connection, wherever it keeps it (found by walking, not by attribute name)."""
    found = [value for _, value in walk(engine) if isinstance(value, Connection)]
    assert found, "the engine holds no Connection"
    return found[0]


def _clients_of(engine: RemoteEngine) -> list[httpx.Client | httpx.AsyncClient]:
    return [value for _, value in walk(engine) if isinstance(value, (httpx.Client, httpx.AsyncClient))]


def _everything_shown(engine: RemoteEngine) -> list[str]:
    from nbollama.magics import StatusReport

    report = StatusReport(engine.snapshot())
    connection = _connection_of(engine)
    shown = [
        repr(engine),
        str(engine),
        f"{engine}",
        engine.summary,
        engine.url,
        repr(engine.info),
        json.dumps(engine.snapshot(), default=repr),
        repr(report),
        report._repr_html_(),
        repr(vars(engine)),
        repr(vars(connection)),
        repr(vars(connection.endpoint)),
        repr(dataclasses.asdict(connection)),
    ]
    shown += [repr(value) for value in vars(engine).values()]
    shown += [str(value) for value in vars(engine).values()]
    clients = _clients_of(engine)
    assert clients, "the engine holds no httpx client"
    for client in clients:
        assert isinstance(client.auth, Credentials)
        shown += [repr(client), repr(vars(client)), repr(dict(client.headers)), repr(client.params)]
    return shown


def test_a_key_from_the_environment_is_sent_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, engines: list[RemoteEngine]
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    with Fake("vllm", api_key=KEY) as fake:
        engine = connect(fake.url, api_key_env=KEY_ENV)
        engines.append(engine)
        result = engine.generate("x", max_tokens=2)[0]
        assert result.ok, result.error
        assert fake.books.requests[-1]["headers"]["Authorization"] == f"Bearer {KEY}"
        assert isinstance(_connection_of(engine).api_key, Secret)
        engine.snapshot()  # a poll
        shown = _everything_shown(engine)
        shown += [result.text, repr(result), str(result)]
        shown += [record.getMessage() for record in caplog.records]
        assert_hidden(*shown)
        assert assert_nothing_reachable_shows_a_secret(engine) > 20
        try:
            _fail_with(engine, _connection_of(engine))
        except RuntimeError:
            text = verbose_traceback(sys.exc_info())
        assert "Secret('***')" in text and "connection" in text  # the locals are there, redacted
        assert_hidden(text)


def test_url_credentials_are_sent_and_never_shown(engines: list[RemoteEngine]) -> None:
    with Fake("openai") as fake:
        engine = connect(f"http://user:{PASSWORD}@127.0.0.1:{fake.port}/v1?api_key={QUERY_KEY}&x=1")
        engines.append(engine)
        assert engine.generate("hello", max_tokens=2)[0].ok
        sent = fake.books.requests[-1]["headers"]["Authorization"]
        assert sent == "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
        assert fake.books.gets and all(g.endswith(f"?api_key={QUERY_KEY}&x=1") for g in fake.books.gets)
        assert engine.url == f"http://user:***@127.0.0.1:{fake.port}?api_key=***&x=1"
        assert_hidden(*_everything_shown(engine))
        assert_nothing_reachable_shows_a_secret(engine)
        try:
            _fail_with(engine, _connection_of(engine))
        except RuntimeError:
            text = verbose_traceback(sys.exc_info())
        assert "Secret('***')" in text
        assert_hidden(text)


def test_a_failed_connection_shows_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RemoteError) as info:
        connect(f"http://user:{PASSWORD}@127.0.0.1:{port}/?token={QUERY_KEY}", api_key_env=KEY_ENV)
    assert "refused" in str(info.value)
    assert_hidden(str(info.value), repr(info.value))
    # from connect() down (this test's own frame shows its constants): connect's url argument is
    # shown redacted, the connection holds Secrets
    text = verbose_traceback((info.type, info.value, info.tb.tb_next))
    assert "connect(url='http://user:***@127.0.0.1" in text and "connection" in text
    assert_hidden(text)


class _EchoingHandler(BaseHTTPRequestHandler):
    """A server that refuses every key and echoes the Authorization header in its error."""

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"error": {"message": f"invalid credentials: {self.headers.get('Authorization')}"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_server_that_echoes_the_key_does_not_get_it_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv(KEY_ENV, KEY)
        with pytest.raises(RemoteError, match=r"HTTP 401.*invalid credentials: Bearer \*\*\*.*the API key was refused") as info:
            connect(f"http://127.0.0.1:{server.server_address[1]}", api_key_env=KEY_ENV)
        assert_hidden(str(info.value))
    finally:
        server.shutdown()
        server.server_close()


# -- end to end: the notebook's path (%nbollama connect, status, %xmode Verbose) -------------


@pytest.fixture
def shell() -> Iterator[Any]:
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbollama")
    mode = ip.InteractiveTB.mode
    yield ip
    ip.run_line_magic("xmode", mode)
    ip.run_line_magic("unload_ext", "nbollama")


def test_the_notebook_path_shows_no_secret(
    shell: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with Fake("vllm", api_key=KEY) as fake:
        shell.run_line_magic("nbollama", f"connect {fake.url} --api-key-env {KEY_ENV}")
        try:
            engine = session.current_engine()
            assert isinstance(engine, RemoteEngine)
            shell.user_ns["secret_test_engine"] = engine
            shell.user_ns["secret_test_connection"] = _connection_of(engine)
            results = shell.run_cell_magic("generate", "--max-tokens 2", "hello")
            assert all(r.ok for r in results)
            assert fake.books.requests[-1]["headers"]["Authorization"] == f"Bearer {KEY}"
            report = shell.run_line_magic("nbollama", "status")
            assert "vllm" in repr(report)
            assert_hidden(repr(report), report._repr_html_())
            shell.run_line_magic("xmode", "Verbose")
            outcome = shell.run_cell(
                "def fail(engine):\n"
                "    connection = secret_test_connection\n"
                "    key = connection.api_key\n"
                "    raise RuntimeError(f'{engine!r} {connection!r} {key!r} {vars(connection)}')\n"
                "fail(secret_test_engine)\n"
            )
            assert isinstance(outcome.error_in_exec, RuntimeError)
            shown = capsys.readouterr()
            assert "Secret('***')" in shown.out and "RuntimeError" in shown.out
            assert_hidden(shown.out, shown.err)
        finally:
            shell.user_ns.pop("secret_test_engine", None)
            shell.user_ns.pop("secret_test_connection", None)
            shell.user_ns.pop("fail", None)
            shell.run_line_magic("nbollama", "disconnect")
    assert session.current_engine() is None
