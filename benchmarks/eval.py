"""lm-evaluation-harness on the same model three ways: nbollama, lm-eval's ``gguf`` backend, ``local-completions``.

The shipped tasks (``examples/data``), each system in its own process, rounds
alternating which goes first; wall time, lm-eval requests per second, and the
metric with its standard error (the metrics must agree within them: the same
model, batch variance only):

* **nbollama** (``nbollama.eval``) at parallel 8: every task's requests through
  the engine's queue at once; a question's options from one prefill;
* **gguf**: lm-eval's own route for a GGUF, one ``/v1/completions`` request at a
  time with ``echo`` and ``logprobs`` against ``python -m llama_cpp.server``
  (``pip install 'llama-cpp-python[server]'``); it has no ``loglikelihood_rolling``,
  so the perplexity task is nbollama's alone;
* **local-completions** against ``llama-server -np 8`` with ``num_concurrent=8``
  (``pip install 'lm_eval[api]'``): ``generate_until`` only, since llama-server
  ignores ``echo`` and returns no prompt log-probabilities.

    python benchmarks/eval.py                         # every question, 3 rounds
    python benchmarks/eval.py --limit 8 --rounds 1    # a quick look

A system whose packages are missing is left out with the line that installs them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _harness import REPO, interleave, machine_line

DATA = REPO / "examples" / "data"
#: (task, the metric reported) for each request kind the benchmark runs
TASKS = {"nbollama_mc": "acc", "nbollama_ppl": "word_perplexity", "nbollama_gen": "exact_match"}
#: which system runs which task
SYSTEMS = {
    "nbollama": ["nbollama_mc", "nbollama_ppl", "nbollama_gen"],
    "gguf": ["nbollama_mc"],
    "local-completions": ["nbollama_gen"],
}
NEEDS = {  # a system's extra packages, and what installs them
    "gguf": (
        ["fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"],
        "pip install 'llama-cpp-python[server]'",
    ),
    "local-completions": (["aiohttp", "tenacity"], "pip install 'lm_eval[api]'"),
}


# -- the worker: one system, in its own process -----------------------------------------------------


def _run_task(config: dict[str, Any], task: str, limit: int | None) -> dict[str, Any]:
    import lm_eval

    from nbollama._eval_tasks import hub_offline, plan_tasks, quiet

    plan = plan_tasks([task], [str(DATA)])
    model = config["lm"] if "lm" in config else config["model"]
    start = time.perf_counter()
    with quiet(), hub_offline(plan.local):
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=config.get("model_args"),
            tasks=plan.specs,
            task_manager=plan.manager,
            limit=limit,
            log_samples=True,
            bootstrap_iters=1000,
        )
    wall = time.perf_counter() - start
    assert out is not None
    requests = sum(len(s["arguments"]) for s in out["samples"][task])
    metric = TASKS[task]
    values = out["results"][task]
    stderr = values.get(f"{metric}_stderr,none")
    return {
        "wall": wall,
        "requests": float(requests),
        "rps": requests / wall,
        "value": float(values[f"{metric},none"]),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
    }


def worker(kind: str, config: dict[str, Any]) -> int:
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    if kind == "nbollama":
        from nbollama import Engine
        from nbollama.eval import NbollamaLM
        from nbollama.sources import resolve_model

        engine = Engine.load(
            resolve_model(config["path"]),
            parallel=config["parallel"],
            ctx=config["ctx"],
            cache_ram=config["cache_ram"],
        )
        config["lm"] = NbollamaLM(engine, progress=False)
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        try:
            answer = _run_task(config, job["task"], job["limit"])
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), file=out, flush=True)
    return 0


class Worker:
    """``benchmarks/eval.py --worker KIND CONFIG``: loaded once, then one task per ``run``."""

    def __init__(self, kind: str, config: dict[str, Any], env: dict[str, str]) -> None:
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                **env,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            },
        )
        if self._read().get("ready") is not True:
            raise RuntimeError(f"the {kind} worker did not start")

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker exited ({self.process.wait()})")
        return dict(json.loads(line))

    def run(self, task: str, limit: int | None) -> dict[str, float]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"task": task, "limit": limit}) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        if "error" in answer:
            raise RuntimeError(f"{self.kind} on {task}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


# -- the servers ---------------------------------------------------------------------------------------


def _wait_http(url: str, process: subprocess.Popen[bytes], seconds: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} did not answer within {seconds:.0f} s")


def _missing(system: str) -> str | None:
    import importlib.util

    modules, hint = NEEDS.get(system, ([], ""))
    gone = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{system}: needs {', '.join(gone)} ({hint})" if gone else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument(
        "--ctx", type=int, default=1024, help="context per slot (nbollama, llama-server)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--cache-ram", type=int, default=1024,
        help="nbollama: MiB of host RAM for prompts evicted from slots (0: none; llama-server keeps its own)",
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], json.loads(args.worker[1]))

    from nbollama.llama_server import LlamaServer, find_binary, free_port
    from nbollama.sources import resolve_model

    model = str(resolve_model(args.model))
    env = {"OMP_WAIT_POLICY": "PASSIVE", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    print(
        f"{machine_line()}; {Path(model).name}; limit={args.limit or 'all'} rounds={args.rounds} "
        f"parallel={args.parallel} threads={args.threads}",
        flush=True,
    )
    systems = []
    for system in args.systems:
        why = _missing(system)
        if why is None and system == "local-completions" and find_binary() is None:
            why = "local-completions: llama-server is not built (python -m nbollama.llama_server build)"
        if why is not None:
            print(f"left out: {why}", flush=True)
        else:
            systems.append(system)
    servers: list[Any] = []
    workers: dict[str, Worker] = {}
    try:
        for system in systems:
            if system == "nbollama":
                config: dict[str, Any] = {
                    "path": model, "parallel": args.parallel, "ctx": args.ctx, "cache_ram": args.cache_ram
                }
            elif system == "gguf":
                port = free_port()
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "llama_cpp.server",
                        "--model",
                        model,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--n_ctx",
                        "2048",
                        "--n_threads",
                        str(args.threads),
                        "--logits_all",
                        "true",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, **env},
                )
                servers.append(process)
                _wait_http(f"http://127.0.0.1:{port}/v1/models", process)
                config = {"model": "gguf", "model_args": f"base_url=http://127.0.0.1:{port}"}
            else:
                server = LlamaServer(
                    model,
                    [
                        "-np",
                        str(args.parallel),
                        "-c",
                        str(args.parallel * args.ctx),
                        "-t",
                        str(args.threads),
                    ],
                    env=env,
                )
                server.start()
                servers.append(server)
                config = {
                    "model": "local-completions",
                    "model_args": f"base_url={server.url}/v1/completions,model=m,num_concurrent={args.parallel},"
                    "tokenizer_backend=None,tokenized_requests=False,max_retries=1",
                }
            workers[system] = Worker(system, config, env)
        table: dict[tuple[str, str], list[dict[str, float]]] = {}
        for task in TASKS:
            setups = [
                (s, (lambda w=workers[s], t=task: w.run(t, args.limit)))
                for s in systems
                if task in SYSTEMS[s]
            ]
            print(f"{task}: {', '.join(s for s, _ in setups)}", file=sys.stderr, flush=True)
            for system, runs in interleave(setups, args.rounds).items():
                table[(task, system)] = runs
    finally:
        for w in workers.values():
            w.close()
        for server in servers:
            if isinstance(server, subprocess.Popen):
                server.terminate()
                server.wait(timeout=30)
            else:
                server.stop()
    print(
        f"\n{'task':14} {'system':18} {'wall s':>8} {'req/s':>8} {'metric':>22}  vs nbollama   (each round's wall)"
    )
    for task, metric in TASKS.items():
        ours = table.get((task, "nbollama"))
        for system in SYSTEMS:
            runs = table.get((task, system))
            if not runs:
                continue
            wall = statistics.median(r["wall"] for r in runs)
            rps = statistics.median(r["rps"] for r in runs)
            value, stderr = runs[0]["value"], runs[0]["stderr"]
            shown = f"{metric} {value:.3f}" + ("" if stderr != stderr else f" ± {stderr:.3f}")
            ratio = (
                ""
                if ours is None or system == "nbollama"
                else f"{wall / statistics.median(r['wall'] for r in ours):.1f}x slower"
            )
            rounds = ", ".join(f"{r['wall']:.1f}" for r in runs)
            print(
                f"{task:14} {system:18} {wall:8.1f} {rps:8.2f} {shown:>22}  {ratio:11}  ({rounds})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
