"""The result store on its own: SQLite on disk, the writer thread, eviction, and each bad condition.

Every bad condition turns the store off with one line and never raises: a folder that cannot be
written (a child process that gave up root), a corrupted file, a full disk (a child process under
``RLIMIT_FSIZE``), a lock another connection holds too long. Several processes share one store.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nbollama._api.store import BUSY_SECONDS, FILE_NAME, ResultStore, parse_size

REPO = Path(__file__).resolve().parent.parent


def _value(i: int, size: int = 10) -> dict[str, object]:
    return {"text": f"answer {i} " + "x" * size, "finish_reason": "stop", "completion_tokens": i}


def _child(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python with the repository importable; its output as text."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )


def test_a_result_is_on_disk_as_soon_as_the_writer_commits(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.put("k1", "model", _value(1))
    store.put("k2", "model", lambda: _value(2))  # a callable is encoded on the writer's thread
    assert store.flush()
    with sqlite3.connect(tmp_path / FILE_NAME) as other:  # another connection, as another kernel
        assert other.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 2
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.get_many(["k1", "k2", "k3"]) == {"k1": _value(1), "k2": _value(2)}
    figures = store.stats()
    assert (figures.entries, figures.by_model, figures.lookups, figures.hits) == (2, {"model": 2}, 3, 2)
    store.close()


def test_big_values_are_compressed_and_come_back_whole(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    big = _value(7, size=50_000)
    store.put("big", "m", big)
    store.flush()
    assert store.get_many(["big"])["big"] == big
    assert store.stats().bytes < 10_000  # zlib: the repeated text shrinks
    store.close()


def test_a_run_remembers_its_finished_rows_until_it_completes(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.start_run("run", 4, resume=False)
    store.row_finished("run", 0, "k0")
    store.row_finished("run", 2, "k2")
    store.flush()
    assert store.run_rows("run") == {0: "k0", 2: "k2"}  # unfinished: a rerun resumes from these
    store.finish_run("run")
    store.flush()
    assert store.run_rows("run") is None  # finished: a rerun starts afresh
    store.start_run("run", 4, resume=False)
    store.flush()
    assert store.run_rows("run") == {}
    store.close()


def test_the_least_recently_used_entries_go_when_the_bound_is_passed(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, max_bytes=4000)

    def put(key: str) -> None:
        store.put(key, "m", {"text": key * 400})  # about 800 bytes, below the compression threshold
        store.flush()
        time.sleep(0.01)  # distinct last_used times

    for key in ("k0", "k1", "k2", "k3"):
        put(key)
    store.get_many(["k0"])  # used again: now k1 is the least recently used
    store.flush()
    time.sleep(0.01)
    put("k4")  # past the bound: k1 goes
    kept = set(store.get_many(["k0", "k1", "k2", "k3", "k4"]))
    assert kept == {"k0", "k2", "k3", "k4"}
    for i in range(5, 12):
        put(f"k{i}")
    assert store.stats().bytes <= 4000
    store.close()


def test_clear_by_model_and_by_age(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.put("a", "alpha", _value(1))
    store.put("b", "beta", _value(2))
    store.flush()
    assert store.clear(model="alpha") == 1
    assert store.clear(older_than=3600) == 0  # used just now
    time.sleep(0.05)
    assert store.clear(older_than=0.01) == 1
    assert store.stats().entries == 0
    store.close()


@pytest.mark.parametrize(("text", "size"), [("2GiB", 2 * 1024**3), ("500M", 500 * 1024**2), ("1e6", 10**6)])
def test_sizes_read_as_people_write_them(text: str, size: int) -> None:
    assert parse_size(text) == size


# -- bad conditions: one line, and the run goes on without the store ------------------------------


def test_a_folder_that_cannot_be_made_turns_the_store_off(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = ResultStore(blocker / "results")
    store.put("k", "m", _value(1))  # nothing raises
    assert store.get_many(["k"]) == {} and not store.enabled
    line = store.take_problem()
    assert line is not None and "result store off" in line and str(blocker) in line
    assert store.take_problem() is None  # said once


def test_a_read_only_folder_turns_the_store_off(tmp_path: Path) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o755)
    drop = "os.setuid(65534)" if os.geteuid() == 0 else f"os.chmod({str(folder)!r}, 0o555)"
    done = _child(f"""
        import json, os
        from nbollama._api.store import ResultStore
        {drop}  # root may write anywhere: a user that owns nothing here
        store = ResultStore(__import__("pathlib").Path({str(folder)!r}))
        store.put("k", "m", {{"text": "x"}})
        print(json.dumps({{"enabled": store.enabled, "found": store.get_many(["k"]), "line": store.take_problem()}}))
    """)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["enabled"] is False and answer["found"] == {}
    assert "cannot be written" in answer["line"]


def test_a_corrupted_file_is_moved_aside_and_a_new_store_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"this is not an SQLite database, it was damaged" * 100)
    store = ResultStore(tmp_path)
    with caplog.at_level("WARNING", logger="nbollama"):
        store.put("k", "m", _value(1))
        assert store.flush()
    assert store.get_many(["k"]) == {"k": _value(1)}
    (moved,) = tmp_path.glob(f"{FILE_NAME}.corrupt-*")
    assert moved.read_bytes().startswith(b"this is not an SQLite")
    assert any(str(moved) in r.getMessage() for r in caplog.records)
    store.close()


def test_a_full_disk_turns_the_store_off_and_the_program_goes_on(tmp_path: Path) -> None:
    done = _child(f"""
        import json, os, resource, signal
        from pathlib import Path
        from nbollama._api.store import ResultStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not kills
        store = ResultStore(Path({str(tmp_path)!r}))
        store.put("first", "m", {{"text": "fits"}})
        store.flush()
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the disk is "full" past 200 kB
        for i in range(400):
            store.put(f"k{{i}}", "m", {{"text": os.urandom(1500).hex()}})  # hardly compressible
        store.flush()
        print(json.dumps({{"line": store.take_problem(), "after": store.get_many(["first"])}}))
    """)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["line"] is not None and "disk is full" in answer["line"], answer
    assert answer["after"] == {}  # off for the rest of the process: reads too


def test_a_lock_held_too_long_turns_the_store_off(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.put("k0", "m", _value(0))
    store.flush()
    holder = sqlite3.connect(tmp_path / FILE_NAME, timeout=0.1)
    holder.execute("BEGIN IMMEDIATE")  # another kernel in the middle of a long write
    try:
        started = time.monotonic()
        store.put("k1", "m", _value(1))
        store.flush(timeout=BUSY_SECONDS + 10)
        assert time.monotonic() - started >= BUSY_SECONDS * 0.9
    finally:
        holder.rollback()
        holder.close()
    line = store.take_problem()
    assert line is not None and "lock" in line
    store.close()


def test_two_processes_write_one_store_at_once(tmp_path: Path) -> None:
    code = f"""
        import sys
        from pathlib import Path
        from nbollama._api.store import ResultStore
        store = ResultStore(Path({str(tmp_path)!r}))
        for i in range(300):
            store.put(f"{{sys.argv[1]}}-{{i}}", sys.argv[1], {{"text": str(i) * 50}})
        assert store.flush(60) and store.problem is None, store.problem
        store.close()
        print("ok")
    """
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen([sys.executable, str(script), name], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    outputs = [w.communicate(timeout=120)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0] and all("ok" in o for o in outputs)
    store = ResultStore(tmp_path)
    assert store.stats().by_model == {"a": 300, "b": 300}
    store.close()
