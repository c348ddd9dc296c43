"""The result store from Python: every finished request on disk, replayed where that is honest.

Each request an engine finishes is written to one SQLite file as it ends
(``$NBOLLAMA_CACHE_DIR``, default ``~/.cache/nbollama/results``), keyed by
everything that decides its output. ``generate(..., cache=)`` and
``%%generate --cache/--no-cache`` choose the policy:

* ``"auto"`` (default): replay what a fresh run would give anyway (greedy,
  seeded or scored requests on an engine in reproducible mode), and the
  finished rows of an identical run that never completed (after a dead kernel);
* ``True``: replay any stored identical request, sampled ones included;
* ``False``: neither read nor write.

A replayed ``Result`` has ``cached=True``. ``NBOLLAMA_CACHE_MAX`` bounds the
store (default 2 GiB); the least recently used entries go first.
"""

from __future__ import annotations

from pathlib import Path

from ._api.replay import default_store, use_store_directory
from ._api.store import DEFAULT_MAX_BYTES, STORE_DIR_ENV, STORE_MAX_ENV, ResultStore, StoreStats

__all__ = [
    "STORE_DIR_ENV",
    "STORE_MAX_ENV",
    "DEFAULT_MAX_BYTES",
    "ResultStore",
    "StoreStats",
    "current",
    "stats",
    "clear",
    "use_directory",
]


def current() -> ResultStore:
    """This process's store."""
    return default_store()


def stats() -> StoreStats:
    """Size, entries per model, and this process's hit rate."""
    return default_store().stats()


def clear(*, model: str | None = None, older_than: float | None = None) -> int:
    """Remove entries: all, one model's (its name as ``stats().by_model`` shows it), or those
    unused for ``older_than`` seconds. How many were removed."""
    return default_store().clear(model=model, older_than=older_than)


def use_directory(directory: str | Path | None) -> ResultStore:
    """Keep results in ``directory`` from now on, in this process (None: the default folder)."""
    return use_store_directory(directory)
