"""What reproducible mode costs: throughput at parallel 8, reproducible vs normal, in one run.

The first 16 prompts of ``shared/bench/prompts.jsonl``, 64 tokens, greedy, ctx
1024 per slot; each mode in its own process, rounds alternating, medians.
It also checks the point of the mode: the reproducible texts at parallel 8
equal those at parallel 1, and says how many normal-mode texts do not.

    python benchmarks/reproducible.py [--rounds 5] [--parallel 8]
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
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts)
    job = {"prompts": prompts, "max_tokens": args.max_tokens, "temperature": 0.0}
    print(
        f"{machine_line()}; prompts={len(prompts)} max_tokens={args.max_tokens} greedy parallel={args.parallel} "
        f"ctx/slot={args.ctx} threads={args.threads} rounds={args.rounds}",
        flush=True,
    )
    base = {"ctx": args.ctx, "threads": args.threads, "prefix_cache": False}  # rounds repeat the prompts
    workers = {
        "normal": Worker("engine", {**base, "parallel": args.parallel}),
        "reproducible": Worker("engine", {**base, "parallel": args.parallel, "reproducible": True}),
    }
    try:
        runs = interleave(
            [(name, lambda w=w: w.run(job)) for name, w in workers.items()], args.rounds
        )
        references = {}
        for name, reproducible in (("normal", False), ("reproducible", True)):
            one = Worker("engine", {**base, "parallel": 1, "reproducible": reproducible})
            try:
                references[name] = one.run(job)["texts"]
            finally:
                one.close()
    finally:
        for worker in workers.values():
            worker.close()
    normal, repro = median(runs["normal"]), median(runs["reproducible"])
    print()
    print(
        f"| mode (parallel {args.parallel}) | tok/s (median) | per round | vs normal | texts differing from parallel 1 |"
    )
    print("|---|---:|---|---:|---:|")
    for name, tps in (("normal", normal), ("reproducible", repro)):
        differ = sum(a != b for a, b in zip(runs[name][0]["texts"], references[name]))
        print(
            f"| {name} | {tps:.1f} | {each(runs[name])} | {tps / normal:.2f}x | {differ} of {len(prompts)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
