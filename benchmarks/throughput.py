"""Aggregate throughput: the engine at several parallel values vs sequential llama-cpp-python.

Fires the first N prompts of ``shared/bench/prompts.jsonl`` at once (greedy,
max_tokens 64 by default) and prints, for each setup measured in this one
run, completion tokens/s, mean TTFT (from the moment the prompts were
fired, so waiting behind other prompts counts) and the ratio to sequential
``Llama.create_completion``, which is what a notebook user would write today.

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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load_prompts(path: Path, n: int) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return [json.loads(ln)["prompt"] for ln in lines[:n]]


def sequential(model_path: Path, prompts: list[str], max_tokens: int, ctx: int, threads: int) -> dict[str, float]:
    """One ``Llama``, one prompt after another, streamed so that TTFT can be seen.

    Streamed chunks carry no token counts, so an untimed greedy pass first
    counts each answer's completion tokens (greedy output is deterministic);
    it also warms the model up.
    """
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = sum(
        llm.create_completion(p, max_tokens=max_tokens, temperature=0.0)["usage"]["completion_tokens"]
        for p in prompts
    )
    ttfts = []
    start = time.perf_counter()
    for prompt in prompts:
        first = None
        for _chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            if first is None:
                first = time.perf_counter() - start
        ttfts.append(first if first is not None else time.perf_counter() - start)
    wall = time.perf_counter() - start
    llm.close()
    return {"tokens": tokens, "wall": wall, "ttft": statistics.mean(ttfts)}


def engine_run(engine: object, prompts: list[str], max_tokens: int) -> dict[str, float]:
    engine.generate(["Warm up."], max_tokens=4, temperature=0.0)  # type: ignore[attr-defined]
    start = time.perf_counter()
    results = engine.generate(prompts, max_tokens=max_tokens, temperature=0.0)  # type: ignore[attr-defined]
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
    print(f"model={model_path.name} prompts={len(prompts)} max_tokens={args.max_tokens} "
          f"greedy threads={args.threads} ctx={args.ctx} flash_attn={args.flash_attn} "
          f"kv_unified={args.kv_unified}", flush=True)

    rows: list[tuple[str, dict[str, float]]] = [
        ("sequential Llama.create_completion", sequential(model_path, prompts, args.max_tokens, args.ctx, args.threads))
    ]
    print(f"  measured {rows[-1][0]}", flush=True)
    flash_attn = {"auto": "auto", "on": True, "off": False}[args.flash_attn]
    base = Engine.load(
        model_path,
        parallel=args.parallel[0],
        ctx=args.ctx,
        threads=args.threads,
        flash_attn=flash_attn,
        kv_unified=args.kv_unified,
    )
    try:
        for n in args.parallel:
            engine = base if n == args.parallel[0] else base.spawn(parallel=n)
            try:
                rows.append((f"nbollama engine parallel={n}", engine_run(engine, prompts, args.max_tokens)))
            finally:
                if engine is not base:
                    engine.close()
            print(f"  measured {rows[-1][0]}", flush=True)
    finally:
        base.close()

    seq_tps = rows[0][1]["tokens"] / rows[0][1]["wall"]
    print()
    print("| setup | completion tokens | wall s | tokens/s | mean TTFT s | vs sequential |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        tps = r["tokens"] / r["wall"]
        print(f"| {name} | {r['tokens']:.0f} | {r['wall']:.2f} | {tps:.1f} | {r['ttft']:.2f} | {tps / seq_tps:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
