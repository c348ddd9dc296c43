"""A benchmark worker: one system, loaded once in this process, run on request.

    python benchmarks/_worker.py engine '{"parallel": 8, "ctx": 1024, "threads": 2}'
    python benchmarks/_worker.py sequential '{"ctx": 1024, "threads": 2}'

It prints ``{"ready": true, ...}`` once loaded, then reads one JSON job per
line (``{"prompts": [...], "max_tokens": 64, ...}``) and answers each with one
JSON line: ``tokens`` (completion tokens), ``wall`` (s), ``tps``, ``ttft`` (mean
seconds from the moment the prompts were fired).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any


def engine_worker(config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    from nbollama import Engine

    fresh = bool(config.pop("fresh_each_run", False))  # a new engine every run: nothing learned carries over
    options = {k: v for k, v in config.items() if k != "model"}
    engine = Engine.load(config.get("model"), **options)
    engine.generate(["Warm up."], max_tokens=4, temperature=0.0, cache=False)

    def run(job: dict[str, Any]) -> dict[str, Any]:
        nonlocal engine
        if fresh:
            engine.close()
            engine = Engine.load(config.get("model"), **options)
        # speed is measured, not the result store: a job that wants the store says cache="auto"
        # (and "store_dir": the folder it keeps results in, from this run on)
        params = {"cache": False, **{k: v for k, v in job.items()
                                     if k not in ("prompts", "store_dir", "render", "max_tokens_each")}}
        if "store_dir" in job:
            from nbollama import store

            store.use_directory(job["store_dir"])
        step_times = getattr(engine, "step_times", None)  # where constrained decoding's time goes
        if step_times is not None:
            step_times(reset=True)
        start = time.perf_counter()
        if "max_tokens_each" in job:  # a length per prompt: all queued at once, as generate() queues them
            handles = [engine.submit(p, **{**params, "max_tokens": k})
                       for p, k in zip(job["prompts"], job["max_tokens_each"], strict=True)]
            results = [h.result() for h in handles]
        else:
            results = engine.generate(job["prompts"], **params)
        wall = time.perf_counter() - start
        if job.get("store_dir"):
            from nbollama import store

            store.current().flush()  # what the run wrote is on disk before the next one reads it
        tokens = sum(r.completion_tokens for r in results)
        extra: dict[str, Any] = {}
        cached = [getattr(r, "cached_tokens", None) for r in results]
        if all(c is not None for c in cached):
            extra["cached_tokens"] = sum(cached)  # type: ignore[arg-type]
        speeds = [r.gen_tps for r in results if r.gen_tps]
        if engine.parallel_max != engine.parallel or getattr(engine, "parallel_history", None):
            extra["parallel_history"] = [
                (round(h["time"] - time.time() + wall, 2), h["parallel"])
                for h in engine.parallel_history
            ]
        if job.get("render"):  # what a cell shows at the end: the Results' table and summary
            from nbollama.results import Results

            started = time.perf_counter()
            shown = Results(results)
            shown._repr_html_()
            repr(shown)
            extra["render"] = time.perf_counter() - started
        extra["replayed"] = sum(1 for r in results if getattr(r, "cached", False))
        if step_times is not None:
            extra["step_times"] = step_times()
            extra["forced_tokens"] = sum(getattr(r, "forced_tokens", 0) for r in results)
        return {
            "tokens": tokens,
            "wall": wall,
            "tps": tokens / wall,
            "per_request_tps": statistics.mean(speeds) if speeds else 0.0,
            "ttft": statistics.mean(r.ttft for r in results if r.ttft is not None),
            "texts": [r.text for r in results],
            "lengths": [r.completion_tokens for r in results],
            **extra,
        }

    return {
        "ready": True,
        "summary": engine.summary,
        "kv_bytes": engine.kv_bytes,
        "kv_type": engine.kv_type,
        "parallel": engine.parallel,
    }, run


def _guard_llama() -> None:
    """``Llama`` has no ``use_extra_bufts`` argument: where the AMX guard says off, its model params
    are made without the extra buffers, as every nbollama load is (this process only)."""
    import llama_cpp.llama as high_level

    from nbollama import amx

    if amx.decide().use_extra_bufts:
        return
    default_params = high_level.llama_cpp.llama_model_default_params

    def guarded() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    high_level.llama_cpp.llama_model_default_params = guarded


def sequential_worker(config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """One ``Llama``, one prompt after another: what a notebook user would write without nbollama."""
    from llama_cpp import Llama

    from nbollama.sources import resolve_model

    threads = config.get("threads", 2)
    _guard_llama()
    llm = Llama(
        str(resolve_model(config.get("model"))),
        n_ctx=config.get("ctx", 1024),
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    llm.create_completion("Warm up.", max_tokens=4, temperature=0.0)

    counted: dict[tuple[tuple[str, ...], int], int] = {}

    def run(job: dict[str, Any]) -> dict[str, Any]:
        prompts, max_tokens = job["prompts"], job["max_tokens"]
        key = (tuple(prompts), max_tokens)
        if (
            key not in counted
        ):  # streamed chunks carry no counts: count once, untimed (greedy repeats)
            counted[key] = sum(
                llm.create_completion(p, max_tokens=max_tokens, temperature=0.0)["usage"][
                    "completion_tokens"
                ]
                for p in prompts
            )
        ttfts: list[float] = []
        start = time.perf_counter()
        for prompt in prompts:
            first = None
            for _chunk in llm.create_completion(
                prompt, max_tokens=max_tokens, temperature=0.0, stream=True
            ):
                if first is None:
                    first = time.perf_counter() - start
            ttfts.append(first if first is not None else time.perf_counter() - start)
        wall = time.perf_counter() - start
        return {
            "tokens": counted[key],
            "wall": wall,
            "tps": counted[key] / wall,
            "ttft": statistics.mean(ttfts),
        }

    return {"ready": True}, run


WORKERS = {"engine": engine_worker, "sequential": sequential_worker}


def main() -> int:
    kind, config = sys.argv[1], json.loads(sys.argv[2])
    amx = config.pop("amx", None)  # "on" / "off": this worker's AMX path (nbollama.amx), before any load
    if amx is not None:
        os.environ["NBOLLAMA_AMX"] = amx
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    ready, run = WORKERS[kind](config)
    print(json.dumps(ready), file=out, flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = run(json.loads(line))
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
