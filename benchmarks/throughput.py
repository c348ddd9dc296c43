"""Aggregate throughput: the engine at several parallel values vs sequential llama-cpp-python.

Fires the first N prompts of ``shared/bench/prompts.jsonl`` at once (greedy,
max_tokens 64 by default) and prints, for each setup, completion tokens/s,
mean TTFT (from the moment the prompts were fired, so waiting behind other
prompts counts) and the ratio to sequential ``Llama.create_completion``, which
is what a notebook user would write without nbollama. Each setup runs in its
own process; rounds alternate; medians are reported.

    python benchmarks/throughput.py                 # parallel 1 2 4 8 16, 5 rounds
    python benchmarks/throughput.py --parallel 1 8 --prompts 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import os
import sys

from _harness import Worker, each, interleave, load_prompts, machine_line, median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5, help="each setup runs once per round, in turn")
    parser.add_argument("--ctx", type=int, default=1024, help="context per slot (and of the sequential Llama)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default=None, help="a .gguf path; default: the bundled Gemma 3 270M")
    args = parser.parse_args(argv)

    prompts = load_prompts(args.prompts)
    job = {"prompts": prompts, "max_tokens": args.max_tokens, "temperature": 0.0}
    print(
        f"{machine_line()}; prompts={len(prompts)} max_tokens={args.max_tokens} greedy threads={args.threads} "
        f"ctx/slot={args.ctx} rounds={args.rounds}; each setup in its own process",
        flush=True,
    )
    workers = {"sequential Llama.create_completion": Worker("sequential", {"model": args.model, "ctx": args.ctx, "threads": args.threads})}
    for n in args.parallel:
        workers[f"nbollama engine parallel={n}"] = Worker(
            "engine", {"model": args.model, "parallel": n, "ctx": args.ctx, "threads": args.threads, "prefix_cache": False}
        )
    try:
        runs = interleave(
            [(name, lambda w=w: w.run(job)) for name, w in workers.items()],
            args.rounds,
        )
    finally:
        for worker in workers.values():
            worker.close()

    base = median(runs["sequential Llama.create_completion"])
    print()
    print("| setup | completion tokens | tokens/s (median) | tokens/s per round | mean TTFT s (median) | vs sequential |")
    print("|---|---:|---:|---|---:|---:|")
    for name, result in runs.items():
        tps = median(result)
        print(
            f"| {name} | {result[0]['tokens']:.0f} | {tps:.1f} | {each(result)} | "
            f"{median(result, 'ttft'):.2f} | {tps / base:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
