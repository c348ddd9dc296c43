"""The result store's writer: one thread that commits what every other thread queued.

The engine's thread only puts an operation on a queue (a finished result, a
run's row). This thread takes whatever has queued up and commits it in one
transaction, so a result is on disk milliseconds after its request ends and
many results at once cost one commit. It also keeps the store under its bound,
least recently used entries first.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from .._logging import BACKGROUND_THREAD_PREFIX

__all__ = ["SCHEMA", "StoreWriter", "encode", "decode"]

_COMPRESS_ABOVE = 2048  # bytes of JSON: logprobs make big values, zlib makes them a fifth
_BATCH = 512  # operations in one transaction at most
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    value BLOB NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_last_used ON entries(last_used);
CREATE INDEX IF NOT EXISTS entries_model ON entries(model);
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY,
    total INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    started REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS run_rows (
    run TEXT NOT NULL,
    row INTEGER NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (run, row)
);
"""

Op = tuple[str, tuple[Any, ...]]


def encode(value: dict[str, Any]) -> bytes:
    data = json.dumps(value, separators=(",", ":")).encode()
    return b"z" + zlib.compress(data, 1) if len(data) > _COMPRESS_ABOVE else b"j" + data


def decode(blob: bytes) -> dict[str, Any]:
    data = zlib.decompress(blob[1:]) if blob[:1] == b"z" else blob[1:]
    value: dict[str, Any] = json.loads(data)
    return value


class StoreWriter:
    """The queue and the thread that empties it into the file.

    ``connect`` opens a connection to the store's file; ``fail(exc)`` turns the
    store off (a full disk, a lock held too long): the writer then drops what
    is queued and stops.
    """

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], fail: Callable[[BaseException], None], max_bytes: int
    ) -> None:
        self._connect = connect
        self._fail = fail
        self.max_bytes = max_bytes
        self._queue: queue.Queue[Op | None] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._queued = 0  # operations put so far
        self._done = 0  # of those, committed (or dropped, the store gone off): the queue is FIFO
        self._stopped = False
        self.bytes: int | None = None  # the values' total, kept as they are written

    def put(self, op: Op) -> None:
        with self._lock:
            if self._stopped:
                return
            self._queued += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name=f"{BACKGROUND_THREAD_PREFIX}store-writer", daemon=True
                )
                self._thread.start()
        self._queue.put(op)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued before this call is committed (or dropped, the store gone
        off); what other threads queue meanwhile is not waited for."""
        deadline = time.monotonic() + timeout
        with self._idle:
            target = self._queued
            while self._done < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout=10)

    def _loop(self) -> None:
        try:
            connection = self._connect()
        except sqlite3.Error as exc:
            self._stop(exc)
            return
        while True:
            first = self._queue.get()
            if first is None:
                break
            ops = [first]
            with contextlib.suppress(queue.Empty):
                while len(ops) < _BATCH:
                    op = self._queue.get_nowait()
                    if op is None:
                        self._queue.put(None)
                        break
                    ops.append(op)
            failed: BaseException | None = None
            try:
                with connection:
                    for kind, args in ops:
                        self._apply(connection, kind, args)
                self._evict_if_over(connection)
            except (sqlite3.Error, OSError) as exc:
                failed = exc
            with self._idle:
                self._done += len(ops)
                self._idle.notify_all()
            if failed is not None:
                self._stop(failed)
                break
        connection.close()

    def _stop(self, exc: BaseException) -> None:
        """The store went off: say why, forget what is queued, so ``flush`` returns."""
        self._fail(exc)
        with self._idle:
            self._stopped = True
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._done = self._queued
            self._idle.notify_all()

    def _apply(self, connection: sqlite3.Connection, kind: str, args: tuple[Any, ...]) -> None:
        now = time.time()
        if kind == "put":
            key, model, value = args
            blob = encode(value() if callable(value) else value)
            connection.execute(
                "INSERT OR REPLACE INTO entries (key, model, value, size, created, last_used) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, blob, len(blob), now, now),
            )
            if self.bytes is not None:
                self.bytes += len(blob)
        elif kind == "touch":
            used, keys = args
            connection.executemany("UPDATE entries SET last_used = ? WHERE key = ?", [(used, k) for k in keys])
        elif kind == "start":
            run, total, resume, started = args
            if not resume:
                connection.execute("DELETE FROM run_rows WHERE run = ?", (run,))
            connection.execute(
                "INSERT INTO runs (run, total, complete, started, updated) VALUES (?, ?, 0, ?, ?) "
                "ON CONFLICT(run) DO UPDATE SET complete = 0, total = excluded.total, updated = excluded.updated",
                (run, total, started, started),
            )
        elif kind == "row":
            run, row, key = args
            connection.execute("INSERT OR REPLACE INTO run_rows (run, row, key) VALUES (?, ?, ?)", (run, row, key))
        elif kind == "finish":  # a completed run has nothing left to resume: it goes, rows and all
            run, _ended = args
            connection.execute("DELETE FROM run_rows WHERE run = ?", (run,))
            connection.execute("DELETE FROM runs WHERE run = ?", (run,))

    def _evict_if_over(self, connection: sqlite3.Connection) -> None:
        """Least recently used entries out until the values fit in 90% of the bound."""
        if self.bytes is None:
            self.bytes = int(connection.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0])
        if self.bytes <= self.max_bytes:
            return
        goal = int(self.max_bytes * 0.9)
        with connection:
            rows = connection.execute("SELECT key, size FROM entries ORDER BY last_used").fetchall()
            doomed: list[str] = []
            for key, size in rows:
                if self.bytes <= goal:
                    break
                doomed.append(key)
                self.bytes -= size
            connection.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in doomed])
            connection.execute("DELETE FROM run_rows WHERE key NOT IN (SELECT key FROM entries)")
