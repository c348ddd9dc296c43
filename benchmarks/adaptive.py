"""Adaptive parallelism against a sweep of static settings: 32 prompts x 64 tokens, greedy.

Static runs at parallel 4, 8, 12 and 16 report aggregate tok/s and mean
per-request tok/s (each request's own speed after its first token). The
static runs that keep per-request speed at or above the floor (15 tok/s)
give the best throughput that respects it; the adaptive run (``max_parallel=16,
min_tps=15``, a fresh engine every round, so it must find the setting by
itself) is measured against that. Each system in its own process; rounds
alternate; medians.

    python benchmarks/adaptive.py [--rounds 3] [--floor 15]
"""

from __future__ import annotations

import argparse
import os
import sys

from _harness import Worker, each, interleave, load_prompts, machine_line, median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--static", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--max-parallel", type=int, default=16)
    parser.add_argument("--floor", type=float, default=15.0)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts)
    job = {"prompts": prompts, "max_tokens": args.max_tokens, "temperature": 0.0}
    print(
        f"{machine_line()}; prompts={len(prompts)} max_tokens={args.max_tokens} greedy ctx/slot={args.ctx} "
        f"threads={args.threads} rounds={args.rounds} floor={args.floor:g} tok/s",
        flush=True,
    )
    base = {"ctx": args.ctx, "threads": args.threads, "prefix_cache": False}  # rounds repeat the prompts
    workers = {f"static {n}": Worker("engine", {**base, "parallel": n}) for n in args.static}
    adaptive = f"adaptive (max {args.max_parallel}, min_tps {args.floor:g})"
    workers[adaptive] = Worker(
        "engine",
        {
            **base,
            "parallel": "adaptive",
            "max_parallel": args.max_parallel,
            "min_tps": args.floor,
            "fresh_each_run": True,
        },
    )
    try:
        runs = interleave(
            [(name, lambda w=w: w.run(job)) for name, w in workers.items()], args.rounds
        )
    finally:
        for worker in workers.values():
            worker.close()
    rows = {name: (median(r), median(r, "per_request_tps")) for name, r in runs.items()}
    respecting = {
        n: tps for n, (tps, speed) in rows.items() if n.startswith("static") and speed >= args.floor
    }
    best_name = max(respecting, key=respecting.get) if respecting else None
    print()
    print("| setup | tok/s (median) | per round | mean per-request tok/s | keeps the floor |")
    print("|---|---:|---|---:|:---:|")
    for name, (tps, speed) in rows.items():
        print(
            f"| {name} | {tps:.1f} | {each(runs[name])} | {speed:.1f} | {'yes' if speed >= args.floor else 'no'} |"
        )
    tps, speed = rows[adaptive]
    if best_name is not None:
        print(
            f"\nbest static that keeps {args.floor:g} tok/s per request: {best_name} ({respecting[best_name]:.1f} tok/s); "
            f"adaptive: {tps / respecting[best_name]:.2f}x of it, mean per-request {speed:.1f} tok/s "
            f"({speed / args.floor:.2f}x the floor)"
        )
    else:
        print(
            f"\nno static setting kept {args.floor:g} tok/s per request; adaptive mean per-request {speed:.1f} tok/s"
        )
    for run in runs[adaptive]:
        print(f"  adaptive changes (s from start, parallel): {run.get('parallel_history')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
