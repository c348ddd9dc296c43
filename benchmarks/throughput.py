"""Aggregate throughput: the engine at several parallel values vs sequential llama-cpp-python.

Fires the first N prompts of ``shared/bench/prompts.jsonl`` at once (greedy,
max_tokens 64 by default) and prints, for each setup measured in this one
run, completion tokens/s, mean TTFT (from the moment the prompts were
fired, so waiting behind other prompts counts) and the ratio to sequential
``Llama.create_completion``, which is what a notebook user would write today.
Every setup runs once per round, the setups in turn, and the median over the
rounds is reported: a shared machine's speed drifts, and drift then hits all
setups alike.

    python benchmarks/throughput.py                 # parallel 1 2 4 8 16
    python benchmarks/throughput.py --parallel 1 8 --prompts 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def load_prompts(path: Path, n: int) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [json.loads(ln)["prompt"] for ln in lines[:n]]


class Sequential:
    """One ``Llama``, one prompt after another: what a notebook user would write today.

    Streamed chunks carry no token counts, so an untimed greedy pass first
    counts each answer's completion tokens (greedy output is deterministic);
    it also warms the model up.
    """

    def __init__(self, model_path: Path, prompts: list[str], max_tokens: int, ctx: int, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(model_path), n_ctx=ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.prompts, self.max_tokens = prompts, max_tokens
        self.tokens = sum(
            self.llm.create_completion(p, max_tokens=max_tokens, temperature=0.0)["usage"]["completion_tokens"]
            for p in prompts
        )

    def run(self) -> dict[str, float]:
        ttfts = []
        start = time.perf_counter()
        for prompt in self.prompts:
            first = None
            for _chunk in self.llm.create_completion(prompt, max_tokens=self.max_tokens, temperature=0.0, stream=True):
                if first is None:
                    first = time.perf_counter() - start
            ttfts.append(first if first is not None else time.perf_counter() - start)
        wall = time.perf_counter() - start
        return {"tokens": self.tokens, "wall": wall, "ttft": statistics.mean(ttfts)}

    def close(self) -> None:
        self.llm.close()


def engine_run(engine: Any, prompts: list[str], max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    results = engine.generate(prompts, max_tokens=max_tokens, temperature=0.0)
    wall = time.perf_counter() - start
    return {
        "tokens": sum(r.completion_tokens for r in results),
        "wall": wall,
        "ttft": statistics.mean(r.ttft for r in results if r.ttft is not None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-file", type=Path, default=REPO.parent / "shared" / "bench" / "prompts.jsonl")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3, help="each setup runs once per round, in turn")
    parser.add_argument("--ctx", type=int, default=1024, help="context per slot (and of the sequential Llama)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--kv-unified", action="store_true", help="one KV buffer shared by all slots")
    parser.add_argument("--model", default=None, help="a .gguf path; default: the bundled Gemma 3 270M")
    args = parser.parse_args(argv)

    from nbollama import Engine
    from nbollama.models import resolve_model

    model_path = resolve_model(args.model)
    prompts = load_prompts(args.prompt_file, args.prompts)
    print(
        f"model={model_path.name} prompts={len(prompts)} max_tokens={args.max_tokens} greedy "
        f"threads={args.threads} ctx={args.ctx} flash_attn={args.flash_attn} kv_unified={args.kv_unified} "
        f"rounds={args.rounds}",
        flush=True,
    )
    flash_attn = {"auto": "auto", "on": True, "off": False}[args.flash_attn]
    sequential = Sequential(model_path, prompts, args.max_tokens, args.ctx, args.threads)
    base = Engine.load(
        model_path, parallel=args.parallel[0], ctx=args.ctx, threads=args.threads,
        flash_attn=flash_attn, kv_unified=args.kv_unified,
    )
    engines = {n: base if n == args.parallel[0] else base.spawn(parallel=n) for n in args.parallel}
    for engine in engines.values():
        engine.generate(["Warm up."], max_tokens=4, temperature=0.0)
    setups: list[tuple[str, Callable[[], dict[str, float]]]] = [("sequential Llama.create_completion", sequential.run)]
    setups += [
        (f"nbollama engine parallel={n}", lambda e=e: engine_run(e, prompts, args.max_tokens))
        for n, e in engines.items()
    ]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in setups}
    try:
        for round_ in range(1, args.rounds + 1):
            for name, run in setups:  # interleaved, so drift in machine speed hits every setup alike
                runs[name].append(run())
            print(f"  round {round_}/{args.rounds} done", flush=True)
    finally:
        for engine in engines.values():
            engine.close()
        sequential.close()

    def median_tps(name: str) -> float:
        return statistics.median(r["tokens"] / r["wall"] for r in runs[name])

    seq_tps = median_tps(setups[0][0])
    print()
    print("| setup | completion tokens | tokens/s (median) | tokens/s per round | mean TTFT s (median) | vs sequential |")
    print("|---|---:|---:|---|---:|---:|")
    for name, _ in setups:
        tps = median_tps(name)
        each = ", ".join(f"{r['tokens'] / r['wall']:.1f}" for r in runs[name])
        ttft = statistics.median(r["ttft"] for r in runs[name])
        print(f"| {name} | {runs[name][0]['tokens']:.0f} | {tps:.1f} | {each} | {ttft:.2f} | {tps / seq_tps:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
