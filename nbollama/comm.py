"""The kernel side of the JupyterLab panel: a Jupyter comm named ``nbollama``.

``%load_ext nbollama`` calls :func:`register`, which registers the comm target
on the kernel's comm manager (so does loading an engine from Python in a
kernel, ``nbollama.load()`` without the magics: :func:`register_in_kernel`); the panel (``labextension/``) opens a comm to it
for the current notebook's kernel and this module streams engine snapshots
back. ``%unload_ext nbollama`` calls :func:`unregister`, which closes every
panel comm (the panel then says to run ``%load_ext nbollama``).

Protocol, version 1 (every message is a JSON object in the comm's ``data``):

kernel -> panel

- ``{"v": 1, "type": "snapshot", "engine": EngineSnapshot | null}``: sent when
  the comm opens, whenever the kernel's engine is loaded, replaced or unloaded,
  in answer to ``refresh``, and while the comm is open at most every 0.25 s
  (4 Hz) and only when something changed (the snapshot's ``seq``, or its
  throughput figure, which decays after generation stops). ``engine`` is
  ``null`` when no engine is loaded or the engine was closed. The snapshot's
  shape is ``nbollama._api.snapshot.EngineSnapshot``.
- ``{"v": 1, "type": "engines", "engines": [{"name", "kind", "model",
  "parallel", "kv_type"}], "default": name | null, "shown": name | null,
  "pinned": name | null}``: the kernel's engines, sent when the comm opens
  and whenever one is added, removed, made the default or selected. The
  panel shows a selector when there are several; snapshots are of the engine
  ``shown``. ``pinned`` names the engine picked with ``select`` (the panel
  then says "pinned to 'NAME'" and offers to follow the default); null while
  the panel follows the default engine (``%nbollama use`` moves it).
- ``{"v": 1, "type": "cancelled", "slot": N, "request_id": id | null}``: the
  answer to ``cancel``; ``request_id`` is null when the slot was idle.
- ``{"v": 1, "type": "error", "message": str}``: the answer to a message that
  could not be understood or carried out (not an object, unknown ``type``, a
  slot that is not a whole number in range, no engine loaded).

panel -> kernel

- ``{"type": "cancel", "slot": N}``: cancel the request slot ``N`` serves.
- ``{"type": "refresh"}``: send a snapshot now.
- ``{"type": "select", "name": NAME | null}``: show the engine called NAME,
  pinned to it until it is unloaded (null: unpin, and follow the kernel's
  default as it changes).
- An optional ``"v": 1`` is accepted; any other ``v`` is an error.

When ``register`` first adds the target it also opens a short-lived comm from
the kernel to the frontend (same target name, ``data={"v": 1, "type":
"hello"}``) so a panel that found no target before ``%load_ext`` connects at
once; the panel closes it. Frontends without the panel close it too (or
ignore it), which costs nothing.

Threads: snapshots are sent from the engine's monitor thread. ipykernel's
``Comm.send`` hands the message to the IOPub thread (``IOPubThread.schedule``
through a per-thread event pipe), so sending from a background thread is
safe; a lock per connection keeps messages from different threads in order.
With JupyterLab >= 4.6 and ipykernel 7 comm messages may arrive on a subshell
thread, so every handler here is thread-safe and never raises.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ._link import EngineLink

if TYPE_CHECKING:
    from .engine import EngineLike, EngineSnapshot

__all__ = [
    "TARGET_NAME",
    "PROTOCOL_VERSION",
    "SNAPSHOT_INTERVAL",
    "CommLike",
    "PanelConnection",
    "register",
    "register_in_kernel",
    "unregister",
    "is_registered",
    "open_connections",
]

TARGET_NAME = "nbollama"
PROTOCOL_VERSION = 1
#: Seconds between two streamed snapshots at most (4 Hz).
SNAPSHOT_INTERVAL = 0.25

logger = logging.getLogger("nbollama.comm")  # a child of "nbollama": nothing printed from background threads

_lock = threading.RLock()
_manager: Any = None  # the comm manager our target is registered on
_connections: set[PanelConnection] = set()


class CommLike(Protocol):
    """What this module uses of a comm (ipykernel's ``Comm`` or a test double)."""

    comm_id: str

    def send(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None: ...

    def on_msg(self, callback: Callable[[dict[str, Any]], object] | None) -> None: ...

    def on_close(self, callback: Callable[[dict[str, Any]], object] | None) -> None: ...

    def close(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None: ...


class _BadMessage(Exception):
    """An incoming message that gets an ``error`` answer."""


def _session() -> Any:
    # Imported late: nbollama/__init__.py may import this module.
    from . import session

    return session


class PanelConnection:
    """One open panel comm: follows the kernel's engine and streams its snapshots."""

    def __init__(self, comm: CommLike) -> None:
        self.comm = comm
        self._lock = threading.RLock()  # keeps messages from different threads in order
        self._closed = False
        self._engine_key: int | None = None
        self._last_key: tuple[int, int, float] | None | str = "nothing sent"
        comm.on_msg(self._on_msg)
        comm.on_close(self._on_close)
        self._link = EngineLink(
            self._on_engine,
            self._on_snapshot,
            interval=SNAPSHOT_INTERVAL,
            on_engines=lambda everyone: self._send_engines(),
        )
        self._link.follow_session()
        self._send_engines()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- engine following (called by the link, with its lock held) ----------------------

    def _on_engine(self, engine: EngineLike | None) -> None:
        self._engine_key = None if engine is None else id(engine)
        if engine is None:
            self._publish(None, force=False)

    def _on_snapshot(self, snapshot: EngineSnapshot | None) -> None:
        self._publish(snapshot, force=False)

    def _publish(self, snapshot: EngineSnapshot | None, *, force: bool) -> None:
        """Send a snapshot unless it says nothing new (same engine, seq and throughput)."""
        with self._lock:
            if self._closed:
                return
            if snapshot is not None and snapshot.get("closed"):
                snapshot = None
            key = (
                None
                if snapshot is None or self._engine_key is None
                else (self._engine_key, snapshot["seq"], snapshot["throughput"])
            )
            if not force and key == self._last_key:
                return
            self._last_key = key
            self._send({"v": PROTOCOL_VERSION, "type": "snapshot", "engine": snapshot})

    def _send_engines(self) -> None:
        """The kernel's engines, for the panel's selector."""
        session = _session()
        shown = self._link.engine
        listed = []
        for name, engine in session.engines().items():
            listed.append(
                {
                    "name": name,
                    "kind": str(getattr(engine, "kind", "local")),  # remote engines name their server
                    "model": engine.model_name,
                    "parallel": engine.parallel,
                    "kv_type": str(getattr(engine, "kv_type", "")),  # a server's is unknown
                }
            )
        self._send(
            {
                "v": PROTOCOL_VERSION,
                "type": "engines",
                "engines": listed,
                "default": session.current_name(),
                "shown": getattr(shown, "name", None) or None,
                "pinned": self._link.selected,
            }
        )

    def refresh(self) -> None:
        """Send a snapshot of the current engine now, changed or not."""
        with self._lock:
            self._last_key = "refresh"  # whatever comes next differs from it
        self._link.refresh()

    # -- incoming messages -----------------------------------------------------------

    def _on_msg(self, msg: Mapping[str, Any]) -> None:
        try:
            content = msg.get("content") if isinstance(msg, Mapping) else None
            data = content.get("data") if isinstance(content, Mapping) else None
            self._handle(data)
        except _BadMessage as exc:
            self._error(str(exc))
        except Exception as exc:  # never let a panel message raise in the kernel
            logger.exception("nbollama: a panel message failed")
            self._error(f"{type(exc).__name__}: {exc}")

    def _handle(self, data: object) -> None:
        if not isinstance(data, Mapping):
            raise _BadMessage(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("v", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION or isinstance(version, bool):
            raise _BadMessage(
                f"protocol version {version!r} is not supported (this kernel speaks {PROTOCOL_VERSION})"
            )
        kind = data.get("type")
        if kind == "refresh":
            self.refresh()
        elif kind == "select":
            name = data.get("name")
            if name is not None and not isinstance(name, str):
                raise _BadMessage(f"select needs a string 'name' or null, got {name!r}")
            try:
                self._link.select(name)
            except ValueError as exc:
                raise _BadMessage(str(exc)) from None
            self._send_engines()
        elif kind == "cancel":
            slot = data.get("slot")
            if not isinstance(slot, int) or isinstance(slot, bool):
                raise _BadMessage(f"cancel needs a whole-number 'slot', got {slot!r}")
            engine = self._link.engine  # the one the panel shows
            if engine is None or engine.closed:
                raise _BadMessage("no engine is loaded: nothing to cancel (run %nbollama load)")
            try:
                request_id = engine.cancel_slot(slot)
            except ValueError as exc:
                raise _BadMessage(str(exc)) from None
            self._send(
                {"v": PROTOCOL_VERSION, "type": "cancelled", "slot": slot, "request_id": request_id}
            )
        elif isinstance(kind, str):
            raise _BadMessage(
                f"unknown message type {kind!r} (expected 'cancel', 'refresh' or 'select')"
            )
        else:
            raise _BadMessage("message without a string 'type'")

    def _error(self, message: str) -> None:
        self._send({"v": PROTOCOL_VERSION, "type": "error", "message": message})

    def _send(self, payload: dict[str, Any]) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.comm.send(payload)
            except Exception:
                logger.exception("nbollama: cannot send to the panel")

    # -- closing ---------------------------------------------------------------------

    def _on_close(self, msg: Mapping[str, Any]) -> None:
        """The panel closed the comm (notebook switched, page closed)."""
        self.close(notify_frontend=False)

    def close(self, *, notify_frontend: bool = True) -> None:
        """Stop streaming; also close the panel's side when ``notify_frontend``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._link.close()
        with _lock:
            _connections.discard(self)
        if notify_frontend:
            try:
                self.comm.close()
            except Exception:
                logger.debug("nbollama: the panel comm was already gone", exc_info=True)


def _open_target(comm: CommLike, msg: Mapping[str, Any]) -> None:
    """The comm target: a panel opened a comm to this kernel."""
    try:
        connection = PanelConnection(comm)
    except Exception as exc:
        # Keep the comm open (the target exists), say what went wrong.
        logger.exception("nbollama: cannot serve the panel")
        try:
            comm.send(
                {"v": PROTOCOL_VERSION, "type": "error", "message": f"{type(exc).__name__}: {exc}"}
            )
        except Exception:
            pass
        return
    with _lock:
        _connections.add(connection)


def _comm_manager(ipython: Any) -> Any:
    kernel = getattr(ipython, "kernel", None)
    return getattr(kernel, "comm_manager", None)


def _announce() -> None:
    """Tell panels that already looked for the target that it exists now."""
    import comm

    try:
        comm.create_comm(target_name=TARGET_NAME, data={"v": PROTOCOL_VERSION, "type": "hello"})
    except Exception:
        logger.debug("nbollama: could not announce the comm target", exc_info=True)


def register(ipython: Any) -> bool:
    """Register the ``nbollama`` comm target on the kernel; False outside a kernel.

    Calling it again is harmless: the target is replaced by itself and the
    announcement is sent only the first time.
    """
    global _manager
    manager = _comm_manager(ipython)
    if manager is None:
        return False
    with _lock:
        first = (
            _manager is not manager
            or getattr(manager, "targets", {}).get(TARGET_NAME) is not _open_target
        )
        manager.register_target(TARGET_NAME, _open_target)
        _manager = manager
    if first:
        _announce()
    return True


def register_in_kernel() -> bool:
    """Register the target on the running IPython kernel, if this code runs in one.

    Called whenever the kernel's engine is set, so a notebook that only calls
    ``nbollama.load()`` (no ``%load_ext nbollama``) still shows in the panel.
    IPython is looked up in ``sys.modules``, never imported: a script's
    engine costs nothing here. Never raises.
    """
    ipython_module = sys.modules.get("IPython")
    get_ipython = getattr(ipython_module, "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
        if shell is None or _comm_manager(shell) is None:
            return False
        if is_registered(shell):
            return True
        return register(shell)
    except Exception:
        logger.debug("nbollama: could not register the panel's comm target", exc_info=True)
        return False


def unregister(ipython: Any) -> None:
    """Remove the comm target and close every open panel comm (each panel then says
    to run ``%load_ext nbollama``). Harmless when nothing is registered."""
    global _manager
    manager = _comm_manager(ipython)
    with _lock:
        if manager is not None and getattr(manager, "targets", {}).get(TARGET_NAME) is _open_target:
            manager.unregister_target(TARGET_NAME, _open_target)
        if manager is _manager:
            _manager = None
        connections = list(_connections)
    for connection in connections:
        connection.close(notify_frontend=True)


def is_registered(ipython: Any) -> bool:
    """Whether this kernel's comm manager has the ``nbollama`` target."""
    manager = _comm_manager(ipython)
    return manager is not None and getattr(manager, "targets", {}).get(TARGET_NAME) is _open_target


def open_connections() -> list[PanelConnection]:
    """The panel comms open now (for tests and diagnostics)."""
    with _lock:
        return list(_connections)
