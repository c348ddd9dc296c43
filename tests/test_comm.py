"""The kernel side of the panel comm (``nbollama.comm``) against a real engine.

A fake comm records what the kernel would send; the real kernel <-> JupyterLab
path is covered by ``test_labextension.py``. The kernel's engine is set with
``nbollama.set_engine`` exactly as ``%nbollama load`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from comm_fakes import FakeComm, FakeShell, wait_until

import nbollama
import nbollama.comm as nbcomm
from nbollama import Engine

LONG_PROMPT = "Write a very long story about a lighthouse keeper and the sea."


@pytest.fixture(scope="session")
def comm_engine() -> Iterator[Engine]:
    """One small engine on the bundled model for this file (2 slots, ctx 256)."""
    engine = Engine.load(None, parallel=2, ctx=256)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def kernel_engine(comm_engine: Engine) -> Iterator[Engine]:
    """``comm_engine`` as the kernel's engine, idle; the kernel's previous engine comes back after."""
    previous = nbollama.current_engine()
    nbollama.set_engine(comm_engine, close_previous=False)
    wait_until(lambda: comm_engine.snapshot()["busy_slots"] == 0, what="engine idle")
    try:
        yield comm_engine
    finally:
        comm_engine.cancel_all()
        wait_until(lambda: comm_engine.snapshot()["busy_slots"] == 0, what="engine idle")
        nbollama.set_engine(previous, close_previous=False)


@pytest.fixture
def panel() -> Iterator[tuple[FakeComm, nbcomm.PanelConnection]]:
    """A panel that opened the comm (through the registered target)."""
    comm = FakeComm()
    nbcomm._open_target(comm, {"content": {"data": {"v": 1}}})
    (connection,) = [c for c in nbcomm.open_connections() if c.comm is comm]
    try:
        yield comm, connection
    finally:
        connection.close(notify_frontend=False)


def wait_settled(engine: Engine, timeout: float = 30.0) -> None:
    """Until the engine is idle and its throughput figure has decayed to 0 (nothing changes any more)."""
    wait_until(
        lambda: engine.snapshot()["busy_slots"] == 0 and engine.snapshot()["throughput"] == 0,
        timeout,
        "idle with zero throughput",
    )


# -- opening ----------------------------------------------------------------------------


def test_open_sends_a_snapshot_of_the_kernels_engine(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, _ = panel
    first = comm.messages()[0]
    assert first["v"] == 1 and first["type"] == "snapshot"
    engine = first["engine"]
    assert engine is not None
    assert engine["parallel"] == 2 and engine["ctx_per_slot"] == 256
    assert [s["id"] for s in engine["slots"]] == [0, 1]
    assert engine["model"]["name"]
    assert nbcomm.open_connections(), "the connection is tracked until closed"


def test_open_without_an_engine_sends_null(comm_engine: Engine) -> None:
    previous = nbollama.current_engine()
    nbollama.set_engine(None, close_previous=False)
    comm = FakeComm()
    try:
        nbcomm._open_target(comm, {})
        assert comm.messages() == [
            {"v": 1, "type": "snapshot", "engine": None},
            {"v": 1, "type": "engines", "engines": [], "default": None, "shown": None, "pinned": None},
        ]
    finally:
        for c in nbcomm.open_connections():
            if c.comm is comm:
                c.close(notify_frontend=False)
        nbollama.set_engine(previous, close_previous=False)


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("cancel", "expected a JSON object"),
        ([1, 2], "expected a JSON object"),
        (None, "expected a JSON object"),
        ({}, "without a string 'type'"),
        ({"type": 5}, "without a string 'type'"),
        ({"type": "explode"}, "unknown message type 'explode'"),
        ({"type": "cancel"}, "whole-number 'slot'"),
        ({"type": "cancel", "slot": "0"}, "whole-number 'slot'"),
        ({"type": "cancel", "slot": 1.0}, "whole-number 'slot'"),
        ({"type": "cancel", "slot": True}, "whole-number 'slot'"),
        ({"type": "cancel", "slot": -1}, "does not exist"),
        ({"type": "cancel", "slot": 2}, "does not exist"),
        ({"type": "cancel", "slot": 10**30}, "does not exist"),
        ({"type": "refresh", "v": 2}, "protocol version 2"),
        ({"type": "refresh", "v": True}, "protocol version True"),
    ],
)
def test_bad_messages_get_an_error_answer(
    kernel_engine: Engine, panel: tuple[FakeComm, Any], data: Any, fragment: str
) -> None:
    comm, connection = panel
    before = len(comm.messages())
    comm.deliver(data)
    answers = [m for m in comm.messages()[before:] if m["type"] != "snapshot"]
    assert len(answers) == 1, answers
    assert answers[0]["type"] == "error" and answers[0]["v"] == 1
    assert fragment in answers[0]["message"]
    assert not connection.closed, "a bad message must not end the connection"


def test_a_malformed_comm_message_is_answered_not_raised(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, connection = panel
    connection._on_msg({"no": "content"})
    connection._on_msg("not even a dict")  # type: ignore[arg-type]
    errors = comm.messages("error")
    assert len(errors) == 2 and all("expected a JSON object" in e["message"] for e in errors)


def test_cancel_without_an_engine_is_an_error(
    comm_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, _ = panel
    previous = nbollama.current_engine()
    nbollama.set_engine(None, close_previous=False)
    try:
        comm.deliver({"type": "cancel", "slot": 0})
        assert "no engine is loaded" in comm.last("error")["message"]
    finally:
        nbollama.set_engine(previous, close_previous=False)


def test_refresh_sends_a_snapshot_now(kernel_engine: Engine, panel: tuple[FakeComm, Any]) -> None:
    comm, _ = panel
    wait_settled(kernel_engine)
    since = time.monotonic()
    comm.deliver({"type": "refresh"})
    comm.deliver({"type": "refresh", "v": 1})
    fresh = comm.messages("snapshot", since)
    assert len(fresh) == 2, "refresh answers even when nothing changed"
    assert fresh[-1]["engine"]["seq"] == kernel_engine.snapshot()["seq"]


# -- cancelling -------------------------------------------------------------------------


def test_cancel_by_slot_ends_that_request(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, _ = panel
    handle = kernel_engine.submit(LONG_PROMPT, max_tokens=400, temperature=0.8, seed=1)
    wait_until(
        lambda: handle.slot is not None and handle.completion_tokens >= 2, what="generation started"
    )
    slot = handle.slot
    assert slot is not None
    comm.deliver({"type": "cancel", "slot": slot})
    answer = comm.last("cancelled")
    assert answer == {"v": 1, "type": "cancelled", "slot": slot, "request_id": handle.id}
    result = handle.result(timeout=30)
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < 400
    # the panel sees the slot's badge say so
    wait_until(
        lambda: any(
            m["engine"] is not None and m["engine"]["slots"][slot]["badge"] == "cancelled"
            for m in comm.messages("snapshot")
        ),
        what="a snapshot with a cancelled badge",
    )


def test_cancel_on_an_idle_slot_answers_null(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, _ = panel
    comm.deliver({"type": "cancel", "slot": 1})
    assert comm.last("cancelled") == {"v": 1, "type": "cancelled", "slot": 1, "request_id": None}
    assert not comm.messages("error")


# -- streaming and its rate -------------------------------------------------------------


def test_snapshots_stream_at_most_four_per_second_and_stop_when_nothing_changes(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, _ = panel
    wait_settled(kernel_engine)
    start = time.monotonic()
    handles = [
        kernel_engine.submit(f"Count from {i} to 100 in words.", max_tokens=40, seed=i)
        for i in range(4)
    ]
    for h in handles:
        h.result(timeout=60)
    busy_for = time.monotonic() - start
    times = comm.times("snapshot", start)
    assert len(times) >= 2, "a busy engine streams snapshots"
    gaps = [b - a for a, b in zip(times, times[1:])]
    # at most 4 per second: one every 0.25 s, less some scheduling jitter, never a burst
    assert min(gaps) >= 0.2, gaps
    assert len(times) <= busy_for * 4 + 3, (len(times), busy_for)
    final = comm.messages("snapshot", start)[-1]["engine"]
    assert final["totals"]["generated_tokens"] > 0

    wait_settled(kernel_engine)
    time.sleep(0.75)  # let the last decaying figure go out
    quiet_from = time.monotonic()
    time.sleep(1.5)
    assert comm.messages(since=quiet_from) == [], "nothing changed, so nothing is sent"


def test_the_panel_lists_the_engines_and_shows_the_one_selected(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, connection = panel
    second = kernel_engine.spawn(parallel=3, ctx=256, kv_type="q8_0")
    try:
        nbollama.session.set_engine(second, name="second")
        listed = comm.last("engines")
        assert [e["name"] for e in listed["engines"]] == ["default", "second"]
        assert listed["engines"][1]["parallel"] == 3 and listed["engines"][1]["kv_type"] == "q8_0"
        assert listed["default"] == "default" and listed["shown"] == "default"
        comm.deliver({"type": "select", "name": "second"})
        assert comm.last("engines")["shown"] == "second"
        wait_until(lambda: comm.last("snapshot")["engine"]["name"] == "second", what="second shown")
        assert comm.last("snapshot")["engine"]["parallel"] == 3
        comm.deliver({"type": "select", "name": "nope"})
        assert "no engine named 'nope'; loaded: default, second" in comm.last("error")["message"]
        comm.deliver({"type": "cancel", "slot": 2})  # the engine shown has slot 2; the default has not
        assert comm.last("cancelled")["slot"] == 2
        nbollama.session.unload("second")  # the engine shown went: back to the default
        wait_until(lambda: comm.last("snapshot")["engine"]["name"] == "default", what="default shown")
        assert comm.last("engines")["engines"][0]["name"] == "default" and len(comm.last("engines")["engines"]) == 1
        assert not connection.closed
    finally:
        if not second.closed:
            nbollama.session.unload("second")


def test_a_pinned_panel_says_so_and_follows_the_default_again_when_asked(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    """A pick in the selector pins the panel (``%nbollama use`` no longer moves it) and the engines
    message says to what; ``select`` null unpins it, and ``use`` moves it again."""
    comm, _ = panel
    second = kernel_engine.spawn(parallel=3, ctx=256)
    try:
        nbollama.session.set_engine(second, name="second")
        assert comm.last("engines")["pinned"] is None  # following the default
        comm.deliver({"type": "select", "name": "default"})  # picked, even the default: pinned
        assert comm.last("engines")["pinned"] == "default"
        nbollama.session.use("second")
        listed = comm.last("engines")
        assert (listed["default"], listed["shown"], listed["pinned"]) == ("second", "default", "default")
        assert comm.last("snapshot")["engine"]["name"] == "default"

        comm.deliver({"type": "select", "name": None})  # the panel's "follow the default"
        listed = comm.last("engines")
        assert (listed["shown"], listed["pinned"]) == ("second", None)
        wait_until(lambda: comm.last("snapshot")["engine"]["name"] == "second", what="default shown")
        nbollama.session.use("default")
        assert comm.last("engines")["shown"] == "default"
        wait_until(lambda: comm.last("snapshot")["engine"]["name"] == "default", what="use followed")

        comm.deliver({"type": "select", "name": "second"})
        nbollama.session.unload("second")  # the pinned engine went: the pin goes with it
        assert (comm.last("engines")["shown"], comm.last("engines")["pinned"]) == ("default", None)
    finally:
        if not second.closed:
            nbollama.session.unload("second")
        nbollama.session.use("default")


def test_a_panel_that_closed_gets_nothing_more(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, connection = panel
    comm.close_from_panel()
    assert connection.closed
    assert connection not in nbcomm.open_connections()
    count = len(comm.messages())
    kernel_engine.generate(["Say hi."], max_tokens=8)
    time.sleep(4 * nbcomm.SNAPSHOT_INTERVAL)
    comm.deliver({"type": "refresh"})
    assert len(comm.messages()) == count
    assert not comm.closed, "closed by the panel: the kernel does not close it back"


# -- following the kernel's engine ------------------------------------------------------


def test_follows_engine_replacement_and_unloading(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, _ = panel
    other = kernel_engine.spawn(parallel=1, ctx=128)
    try:
        since = time.monotonic()
        nbollama.set_engine(other, close_previous=False)
        replaced = comm.messages("snapshot", since)
        assert replaced and replaced[0]["engine"]["parallel"] == 1

        # the old engine's activity no longer reaches the panel
        since = time.monotonic()
        kernel_engine.generate(["Name a colour."], max_tokens=8)
        time.sleep(4 * nbcomm.SNAPSHOT_INTERVAL)
        assert all(m["engine"]["parallel"] == 1 for m in comm.messages("snapshot", since))

        # the new engine's activity does
        other.generate(["Name a fruit."], max_tokens=8)
        wait_until(
            lambda: any(
                m["engine"]["totals"]["generated_tokens"] > 0
                for m in comm.messages("snapshot", since)
            ),
            what="a snapshot of the new engine's work",
        )

        since = time.monotonic()
        nbollama.set_engine(None, close_previous=False)
        assert comm.messages("snapshot", since) == [{"v": 1, "type": "snapshot", "engine": None}]

        since = time.monotonic()
        nbollama.set_engine(kernel_engine, close_previous=False)
        assert comm.messages("snapshot", since)[0]["engine"]["parallel"] == 2
    finally:
        nbollama.set_engine(kernel_engine, close_previous=False)
        other.close()


def test_an_engine_closed_directly_reads_as_no_engine(
    kernel_engine: Engine, panel: tuple[FakeComm, Any]
) -> None:
    comm, _ = panel
    other = kernel_engine.spawn(parallel=1, ctx=128)
    try:
        nbollama.set_engine(other, close_previous=False)
        since = time.monotonic()
        other.close()
        wait_until(
            lambda: (
                {"v": 1, "type": "snapshot", "engine": None} in comm.messages("snapshot", since)
            ),
            what="a null snapshot after close()",
        )
    finally:
        nbollama.set_engine(kernel_engine, close_previous=False)
        other.close()


# -- registering on a kernel ------------------------------------------------------------


def test_register_twice_is_harmless_and_unregister_closes_panels(
    kernel_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import comm as comm_package

    announced: list[dict[str, Any]] = []
    monkeypatch.setattr(comm_package, "create_comm", lambda **kw: announced.append(kw))
    shell = FakeShell()
    targets = shell.kernel.comm_manager.targets

    assert nbcomm.register(shell) is True
    assert nbcomm.register(shell) is True
    assert list(targets) == ["nbollama"] and nbcomm.is_registered(shell)
    assert announced == [{"target_name": "nbollama", "data": {"v": 1, "type": "hello"}}], (
        "announced once"
    )

    comms = [FakeComm(), FakeComm()]
    for c in comms:
        targets["nbollama"](c, {"content": {"data": {}}})
    connections = [c for c in nbcomm.open_connections() if c.comm in comms]
    assert len(connections) == 2

    nbcomm.unregister(shell)
    assert targets == {} and not nbcomm.is_registered(shell)
    assert all(c.closed for c in comms), "the kernel closes the panels' comms"
    assert all(c.closed for c in connections)
    assert not any(c.comm in comms for c in nbcomm.open_connections())
    nbcomm.unregister(shell)  # again: harmless

    assert nbcomm.register(shell) is True
    assert len(announced) == 2, "registering after unregistering announces again"
    nbcomm.unregister(shell)


def test_register_outside_a_kernel_does_nothing() -> None:
    class TerminalShell:
        pass

    assert nbcomm.register(TerminalShell()) is False
    assert nbcomm.is_registered(TerminalShell()) is False
    nbcomm.unregister(TerminalShell())


# -- found without %load_ext -----------------------------------------------------------


def test_setting_an_engine_in_a_kernel_registers_the_target(
    comm_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``nbollama.load()`` from Python (no ``%load_ext``) still gives the panel its target."""
    import comm as comm_package
    import IPython

    announced: list[dict[str, Any]] = []
    monkeypatch.setattr(comm_package, "create_comm", lambda **kw: announced.append(kw))
    shell = FakeShell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    previous = nbollama.current_engine()
    try:
        nbollama.set_engine(None, close_previous=False)
        assert not nbcomm.is_registered(shell), "no engine: nothing registered"
        nbollama.set_engine(comm_engine, close_previous=False)
        assert nbcomm.is_registered(shell)
        assert announced == [{"target_name": "nbollama", "data": {"v": 1, "type": "hello"}}]
        nbollama.set_engine(comm_engine, close_previous=False)
        assert len(announced) == 1, "set again: not announced again"

        # a panel that opens the comm now sees the engine
        comm = FakeComm()
        shell.kernel.comm_manager.targets["nbollama"](comm, {"content": {"data": {"v": 1}}})
        assert comm.messages("snapshot")[0]["engine"]["parallel"] == 2
    finally:
        nbcomm.unregister(shell)
        nbollama.set_engine(previous, close_previous=False)


def test_outside_a_kernel_setting_an_engine_registers_nothing(
    comm_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import IPython

    class TerminalShell:  # IPython in a terminal: no kernel, no comm manager
        pass

    monkeypatch.setattr(IPython, "get_ipython", lambda: TerminalShell())
    assert nbcomm.register_in_kernel() is False
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)  # plain Python
    assert nbcomm.register_in_kernel() is False
    previous = nbollama.current_engine()
    try:
        nbollama.set_engine(comm_engine, close_previous=False)  # must not raise
    finally:
        nbollama.set_engine(previous, close_previous=False)


@pytest.mark.timeout(180)
def test_a_real_kernel_answers_the_panel_after_nbollama_load_alone() -> None:
    """In an ipykernel: before any engine the panel's comm is refused (closed at once); after
    ``nbollama.load()``, with no ``%load_ext``, the kernel announces the target and answers
    the panel's comm with a snapshot of the engine."""
    import queue as queue_module

    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        seen: list[dict[str, Any]] = []

        def execute(code: str) -> None:
            msg_id = kc.execute(code)
            reply = kc.get_shell_msg(timeout=120)
            while reply["parent_header"].get("msg_id") != msg_id:
                reply = kc.get_shell_msg(timeout=120)
            assert reply["content"]["status"] == "ok", reply["content"]

        def drain(until: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    msg = kc.get_iopub_msg(timeout=0.5)
                except queue_module.Empty:
                    continue
                seen.append(msg)
                if until(msg):
                    return msg
            return None

        def open_panel_comm(comm_id: str) -> None:
            msg = kc.session.msg(
                "comm_open",
                {"comm_id": comm_id, "target_name": "nbollama", "data": {"v": 1, "client": "test"}},
            )
            kc.shell_channel.send(msg)

        def ours(msg: dict[str, Any], comm_id: str, kind: str) -> bool:
            return msg["msg_type"] == kind and msg["content"].get("comm_id") == comm_id

        execute("import nbollama")
        open_panel_comm("before")
        closed = drain(lambda m: ours(m, "before", "comm_close"), 30)
        assert closed is not None, "without an engine (and no %load_ext) the comm is refused"

        execute("engine = nbollama.load(parallel=1, ctx=256)")
        hello = drain(lambda m: m["msg_type"] == "comm_open", 20)
        assert hello is not None and hello["content"]["target_name"] == "nbollama", (
            "loading an engine announces the target to panels that looked before"
        )
        assert hello["content"]["data"] == {"v": 1, "type": "hello"}

        open_panel_comm("after")
        answer = drain(lambda m: ours(m, "after", "comm_msg") or ours(m, "after", "comm_close"), 30)
        assert answer is not None and answer["msg_type"] == "comm_msg", answer
        data = answer["content"]["data"]
        assert data["type"] == "snapshot" and data["engine"] is not None
        assert data["engine"]["parallel"] == 1 and data["engine"]["ctx_per_slot"] == 256
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
