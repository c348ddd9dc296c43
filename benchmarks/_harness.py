"""What every benchmark here shares: prompts, one process per system, interleaved rounds, medians.

A llama-cpp-python ``Llama`` or a second engine in the measuring process
changes what is measured (libgomp's thread accounting, caches), so each
system runs in a worker process of its own (``_worker.py``), loaded once and
driven over stdin/stdout with one JSON line per run. Rounds alternate the
order of the systems, so drift in a shared machine's speed falls on all of
them; the median over rounds is reported, with every round's figure.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROMPT_FILES = [REPO.parent / "shared" / "bench" / "prompts.jsonl", Path("/work/shared/bench/prompts.jsonl")]

Run = dict[str, float]


def load_prompts(n: int, path: Path | None = None) -> list[str]:
    """The first ``n`` prompts of ``shared/bench/prompts.jsonl`` (one ``{"prompt": ...}`` per line)."""
    for candidate in [path] if path is not None else PROMPT_FILES:
        if candidate is not None and candidate.exists():
            lines = [ln for ln in candidate.read_text().splitlines() if ln.strip()]
            prompts = [json.loads(ln)["prompt"] for ln in lines[:n]]
            if len(prompts) < n:
                raise SystemExit(f"{candidate} has only {len(prompts)} prompts, {n} asked")
            return prompts
    raise SystemExit(f"no prompts file found (tried {', '.join(map(str, PROMPT_FILES))})")


class Worker:
    """One system in its own process: ``_worker.py KIND CONFIG``, loaded once, then ``run(job)`` per round."""

    def __init__(self, kind: str, config: dict[str, Any]) -> None:
        self.kind = kind
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "_worker.py"), kind, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self._read()
        if ready.get("ready") is not True:
            raise RuntimeError(f"{kind} worker did not start: {ready}")
        self.info: dict[str, Any] = ready

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker exited ({self.process.wait()})")
        return json.loads(line)

    def run(self, job: dict[str, Any]) -> Run:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"{self.kind} worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def interleave(setups: Sequence[tuple[str, Callable[[], Run]]], rounds: int) -> dict[str, list[Run]]:
    """Run every setup once per round, the order reversed every other round."""
    runs: dict[str, list[Run]] = {name: [] for name, _ in setups}
    for round_ in range(rounds):
        order = setups if round_ % 2 == 0 else list(reversed(setups))
        for name, run in order:
            runs[name].append(run())
        print(f"  round {round_ + 1}/{rounds} done", file=sys.stderr, flush=True)
    return runs


def median(runs: list[Run], key: str = "tps") -> float:
    return statistics.median(r[key] for r in runs)


def each(runs: list[Run], key: str = "tps", fmt: str = "{:.1f}") -> str:
    return ", ".join(fmt.format(r[key]) for r in runs)


def machine_line() -> str:
    import platform

    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"


def server_run(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[Run, list[str]]:
    """``clients`` threads over llama-server's ``/completion``, each sending the next body when its
    last is answered (not streamed: the server's cheapest mode); the run and each answer's text."""
    import httpx

    todo: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    for item in enumerate(bodies):
        todo.put(item)
    texts: list[str] = [""] * len(bodies)
    tokens: list[int] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                try:
                    i, body = todo.get_nowait()
                except queue.Empty:
                    return
                answer = http.post("/completion", json=body)
                if answer.status_code != 200:
                    errors.append(answer.text)
                    return
                data = answer.json()
                texts[i] = data["content"]
                tokens.append(int(data["tokens_predicted"]))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"llama-server answered with an error: {errors[0][:300]}")
    run = {"tokens": float(sum(tokens)), "wall": wall, "tps": sum(tokens) / wall, "pps": len(bodies) / wall}
    return run, texts
