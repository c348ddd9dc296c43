"""Kill and resume: a real kernel dies by SIGKILL halfway through a 200-row cell; a new kernel runs the
same cell, takes every finished row from the store and runs only the rest, and the texts equal an
uninterrupted run's (reproducible mode)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from jupyter_client.manager import KernelManager

from nbollama import Engine

pytestmark = pytest.mark.notebook

ROWS = 200
SETUP = """
%load_ext nbollama
%nbollama load --parallel 8 --ctx 256 --reproducible
rows = [f"Item {i}: a word that rhymes with {w} is" for i, w in enumerate(["cat", "sun", "tree", "blue"] * 50)]
"""
CELL = """%%generate --each rows --max-tokens 8 --temperature 0 --out results --quiet
{item}"""
REPORT = """
import json, nbollama
json.dump({{"texts": results.texts, "replayed": sum(r.cached for r in results),
           "submitted": nbollama.current_engine().snapshot()["totals"]["submitted"]}}, open({path!r}, "w"))
"""


def _rows_in_store(store: Path) -> int:
    database = store / "results.sqlite3"
    if not database.exists():
        return 0
    with sqlite3.connect(database, timeout=5) as connection:
        try:
            return int(connection.execute("SELECT COUNT(*) FROM run_rows").fetchone()[0])
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0


def _kernel(store: Path) -> KernelManager:
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(env={**os.environ, "NBOLLAMA_CACHE_DIR": str(store)})
    return manager


def _run(manager: KernelManager, code: str, timeout: float = 300) -> None:
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        reply = client.execute_interactive(code, timeout=timeout, output_hook=lambda _msg: None)
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        client.stop_channels()


def test_a_killed_kernel_loses_only_its_running_rows(tmp_path: Path, model_path: Path) -> None:
    store = tmp_path / "store"
    first = _kernel(store)
    try:
        _run(first, SETUP)
        client = first.client()
        client.start_channels()
        client.execute(CELL)  # no waiting: the test kills it halfway
        deadline = time.monotonic() + 300
        while _rows_in_store(store) < ROWS // 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = first.provisioner.process.pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
        client.stop_channels()
        time.sleep(0.5)  # the writer commits in milliseconds: what is in the store now stays
        before_kill = _rows_in_store(store)
    finally:
        first.cleanup_resources()
    assert ROWS // 2 <= before_kill < ROWS, before_kill

    second = _kernel(store)
    report = tmp_path / "report.json"
    try:
        _run(second, SETUP)
        _run(second, CELL)
        _run(second, REPORT.format(path=str(report)))
    finally:
        second.shutdown_kernel(now=True)
    answer = json.loads(report.read_text())
    print(f"rows before the kill {before_kill}, replayed {answer['replayed']}, run after {answer['submitted']}")
    assert answer["replayed"] == before_kill  # every row that finished came from the store
    assert answer["submitted"] == ROWS - before_kill  # and only the rest reached the engine

    rows = [f"Item {i}: a word that rhymes with {w} is" for i, w in enumerate(["cat", "sun", "tree", "blue"] * 50)]
    with Engine.load(model_path, parallel=4, ctx=256, reproducible=True) as engine:
        expected = [r.text for r in engine.generate(rows, max_tokens=8, temperature=0.0, cache=False)]
    assert answer["texts"] == expected  # as if nothing had happened
