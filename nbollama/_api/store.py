"""The result store: every finished request on disk, in SQLite, as it ends.

One file (WAL mode) shared by every kernel on the machine, under
``$NBOLLAMA_CACHE_DIR`` (default ``~/.cache/nbollama/results``). A request's
entry is keyed by everything that decides its output (``nbollama._api.replay``
builds the key); its value is the whole ``Result`` as JSON. Runs (one
``generate()`` call or ``%%generate`` cell) record which of their rows
finished, so an identical run after a dead kernel takes those from here.

Writes go through one writer thread: the engine's thread only puts a finished
result on a queue. The writer commits whatever has queued up in one
transaction, so a result is on disk a few milliseconds after its request ends,
and a kernel killed mid-run loses only the requests still running. WAL with
``synchronous=NORMAL`` survives a killed process; only a power cut can lose
the last commits.

Nothing here ever fails a request. A folder that cannot be written, a full
disk, a corrupted file or a lock held too long turns the store off for this
process with one line saying why (``problem``); the run goes on without it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._dirs import cache_root
from .store_writer import SCHEMA, Op, StoreWriter, decode

__all__ = [
    "STORE_DIR_ENV",
    "STORE_MAX_ENV",
    "DEFAULT_MAX_BYTES",
    "ResultStore",
    "StoreStats",
    "default_directory",
    "parse_size",
]

STORE_DIR_ENV = "NBOLLAMA_CACHE_DIR"
STORE_MAX_ENV = "NBOLLAMA_CACHE_MAX"
DEFAULT_MAX_BYTES = 2 * 1024**3
FILE_NAME = "results.sqlite3"
#: How long a reader or the writer waits for another kernel's lock before giving up.
BUSY_SECONDS = 2.0


def default_directory() -> Path:
    """``$NBOLLAMA_CACHE_DIR``, else ``results/`` in nbollama's cache folder."""
    configured = os.environ.get(STORE_DIR_ENV)
    return Path(configured).expanduser() if configured else cache_root() / "results"


def parse_size(text: str) -> int:
    """``"2GiB"``, ``"500M"``, ``"1e9"`` -> bytes; ``ValueError`` for anything else."""
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in units and cleaned[-1:] else (cleaned, "")
    value = float(number) * units[unit]
    if not value > 0:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def _max_bytes() -> int:
    configured = os.environ.get(STORE_MAX_ENV)
    if not configured:
        return DEFAULT_MAX_BYTES
    try:
        return parse_size(configured)
    except (ValueError, IndexError):
        return DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class StoreStats:
    """What ``%nbollama cache`` shows."""

    path: Path | None
    enabled: bool
    problem: str | None
    bytes: int  # the values' bytes (the file holds a little more: indexes, free pages)
    file_bytes: int
    max_bytes: int
    entries: int
    by_model: dict[str, int]
    lookups: int  # this process's
    hits: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class ResultStore:
    """One SQLite file, a writer thread, and the store's state for this process."""

    def __init__(self, directory: Path | None = None, *, max_bytes: int | None = None) -> None:
        self.directory = directory or default_directory()
        self.path = self.directory / FILE_NAME
        self.max_bytes = max_bytes or _max_bytes()
        self.problem: str | None = None  # why the store is off, once it is
        self._reported = False
        self._local = threading.local()  # one reading connection per thread
        self._lock = threading.Lock()
        self._opened = False
        self._writer = StoreWriter(self._connect, self._fail, self.max_bytes)
        self.lookups = self.hits = 0

    # -- opening, and giving up ------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.problem is None and self._open()

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=BUSY_SECONDS, check_same_thread=False)
        connection.execute(f"PRAGMA busy_timeout={int(BUSY_SECONDS * 1000)}")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def _create(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        connection = self._connect()
        try:
            if connection.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise sqlite3.OperationalError("the file system does not allow WAL mode")
            if connection.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            connection.executescript(SCHEMA)
        finally:
            connection.close()

    def _open(self) -> bool:
        """Create the folder and the file (once); False, with ``problem`` set, if that fails.

        A corrupted file is moved aside (``results.sqlite3.corrupt-<time>``) and a new one
        started, with one line saying where the old one went.
        """
        with self._lock:
            if self._opened or self.problem is not None:
                return self.problem is None
            moved = None
            try:
                try:
                    self._create()
                except sqlite3.DatabaseError as exc:
                    if not _is_corruption(exc):
                        raise
                    moved = self._move_aside()
                    if moved is None:
                        return False
                    self._create()
            except (sqlite3.Error, OSError) as exc:
                self.problem = self._explain(exc)
                return False
            self._opened = True
        if moved is not None:
            self._note(f"the result store at {self.path} was corrupted: it was moved to {moved}, "
                       "and a new one started")
        return True

    def _move_aside(self) -> Path | None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.replace(Path(f"{target}{suffix}"))
        except OSError as exc:
            self.problem = f"the result store at {self.path} is corrupted and could not be moved aside: {exc}"
            return None
        return target

    def _explain(self, exc: BaseException) -> str:
        text = str(exc)
        if isinstance(exc, PermissionError) or "readonly" in text or "read-only" in text:
            why = "its folder cannot be written"
        elif "disk is full" in text or "No space" in text or isinstance(exc, OSError) and exc.errno in (27, 28):
            why = "the disk is full"
        elif "disk I/O error" in text:  # SQLite's word for a write refused (ENOSPC, EFBIG, a quota)
            why = "the disk is full, or a write to it failed (disk I/O error)"
        elif "locked" in text or "busy" in text:
            why = f"another kernel held its lock for more than {BUSY_SECONDS:.0f} s"
        else:
            why = text
        return f"{why} ({self.path})"

    def _fail(self, exc: BaseException) -> None:
        """Turn the store off for this process (any thread); the reason reaches the user once."""
        with self._lock:
            if self.problem is None:
                self.problem = self._explain(exc)

    def _note(self, message: str) -> None:
        from .._logging import logger

        logger.warning("nbollama: %s", message)

    def take_problem(self) -> str | None:
        """The reason the store is off, once: for the caller's thread to show in one line."""
        with self._lock:
            if self.problem is None or self._reported:
                return None
            self._reported = True
            return f"result store off: {self.problem}; results are not kept on disk this session"

    # -- reading (the caller's thread) -----------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
        return connection

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored values of those keys that have one (a store that is off has none)."""
        if not keys or not self.enabled:
            return {}
        self.flush()  # what this process finished a moment ago is found too
        found: dict[str, dict[str, Any]] = {}
        try:
            reader = self._reader()
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for key, blob in reader.execute(f"SELECT key, value FROM entries WHERE key IN ({marks})", chunk):
                    found[key] = decode(blob)
        except (sqlite3.Error, ValueError, zlib.error) as exc:
            if isinstance(exc, sqlite3.DatabaseError) and _is_corruption(exc):
                self._fail(sqlite3.DatabaseError(f"the file is corrupted ({exc})"))
            else:
                self._fail(exc)
            return {}
        with self._lock:
            self.lookups += len(keys)
            self.hits += len(found)
        if found:
            self._put(("touch", (time.time(), tuple(found))))
        return found

    def run_rows(self, run: str) -> dict[int, str] | None:
        """An unfinished run's finished rows (row -> key); None when no such run is unfinished."""
        if not self.enabled:
            return None
        self.flush()  # a run this process just finished reads as finished
        try:
            reader = self._reader()
            state = reader.execute("SELECT complete FROM runs WHERE run = ?", (run,)).fetchone()
            if state is None or state[0]:
                return None
            return dict(reader.execute("SELECT row, key FROM run_rows WHERE run = ?", (run,)).fetchall())
        except sqlite3.Error as exc:
            self._fail(exc)
            return None

    # -- writing (any thread puts; the writer thread commits) ------------------------------------

    def _put(self, op: Op) -> None:
        if self.enabled:  # opens the file (once) before the writer's first commit
            self._writer.put(op)

    def put(self, key: str, model: str, value: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """Keep a finished result (from any thread: the engine's done-callback calls this). A
        callable ``value`` is called on the writer's thread, so the caller only queues."""
        self._put(("put", (key, model, value)))

    def start_run(self, run: str, total: int, *, resume: bool) -> None:
        """A run begins: a new one forgets the rows of an earlier, finished one with this key."""
        self._put(("start", (run, total, resume, time.time())))

    def row_finished(self, run: str, row: int, key: str) -> None:
        self._put(("row", (run, row, key)))

    def finish_run(self, run: str) -> None:
        self._put(("finish", (run, time.time())))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed (tests, and before reading)."""
        return self._writer.flush(timeout)

    # -- managing ---------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        by_model: dict[str, int] = {}
        total = 0
        if self.enabled:
            self.flush()
            try:
                reader = self._reader()
                by_model = dict(reader.execute("SELECT model, COUNT(*) FROM entries GROUP BY model ORDER BY 2 DESC"))
                total = int(reader.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0])
            except sqlite3.Error as exc:
                self._fail(exc)
        file_bytes = sum(
            Path(f"{self.path}{s}").stat().st_size for s in ("", "-wal") if Path(f"{self.path}{s}").exists()
        )
        return StoreStats(
            path=self.path,
            enabled=self.problem is None,
            problem=self.problem,
            bytes=total,
            file_bytes=file_bytes,
            max_bytes=self.max_bytes,
            entries=sum(by_model.values()),
            by_model=by_model,
            lookups=self.lookups,
            hits=self.hits,
        )

    def clear(self, *, model: str | None = None, older_than: float | None = None) -> int:
        """Remove entries (of one model, or unused for ``older_than`` seconds); how many went."""
        if not self.enabled:
            return 0
        self.flush()
        where, args = [], []  # type: tuple[list[str], list[Any]]
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if older_than is not None:
            where.append("last_used < ?")
            args.append(time.time() - older_than)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        try:
            connection = self._connect()
            try:
                with connection:
                    removed = connection.execute(f"DELETE FROM entries{clause}", args).rowcount
                    connection.execute("DELETE FROM run_rows WHERE key NOT IN (SELECT key FROM entries)")
                    if not where:
                        connection.execute("DELETE FROM runs")
            finally:
                connection.close()
        except sqlite3.Error as exc:
            self._fail(exc)
            return 0
        self._writer.bytes = None
        return int(removed)

    def close(self) -> None:
        """Commit what is queued and stop the writer."""
        self._writer.close()
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


def _is_corruption(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("not a database", "malformed", "corrupt", "quick_check failed"))
