"""What each KV-cache type costs and buys: memory, throughput, quality, and slots in a fixed budget.

16 prompts x 64 tokens, greedy, at parallel 8 (issue 21's workload). Each type
runs in an engine worker process of its own and rounds alternate the order;
the table gives medians, the ratio to f16 and its range over rounds. Quality
(greedy agreement, mean KL over the first 32 generated positions, the
reference text's perplexity) is measured afterwards, alone, with
``nbollama.bench.kv_quality``. The fixed budget is f16's KV at parallel 8:
each type then runs with as many slots as that budget holds.

    python benchmarks/kv_precision.py                 # 5 rounds
    python benchmarks/kv_precision.py --rounds 3 --types f16,q8_0
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
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    types = ["f16", *[t for t in args.types.split(",") if t and t != "f16"]]
    prompts = load_prompts(args.prompts)
    print(
        f"{machine_line()}; prompts={len(prompts)} max_tokens={args.max_tokens} greedy "
        f"parallel={args.parallel} ctx/slot={args.ctx} rounds={args.rounds}",
        flush=True,
    )
    job = {"prompts": prompts, "max_tokens": args.max_tokens, "temperature": 0.0}
    base = {"parallel": args.parallel, "ctx": args.ctx, "threads": args.threads, "prefix_cache": False}
    workers = {t: Worker("engine", {**base, "kv_type": t}) for t in types}
    try:
        runs = interleave([(t, lambda w=workers[t]: w.run(job)) for t in types], args.rounds)
        kv_bytes = {t: int(workers[t].info["kv_bytes"]) for t in types}
    finally:
        for w in workers.values():
            w.close()

    quality = _quality(types, prompts, args)
    print()
    print(f"| KV type | KV MiB (parallel {args.parallel}) | vs f16 | tok/s (median) | per round | / f16 (median) "
          "| range over rounds | greedy texts same | mean KL (nats) | top-1 same | perplexity |")
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|")
    for t in types:
        ratios = [r["tps"] / b["tps"] for b, r in zip(runs["f16"], runs[t])]
        q = quality.row(t)
        print(
            f"| {t} | {kv_bytes[t] / 2**20:.1f} | {kv_bytes[t] / kv_bytes['f16']:.3f}x | {median(runs[t]):.1f} "
            f"| {each(runs[t])} | {median(runs[t]) / median(runs['f16']):.3f}x | {min(ratios):.3f}-{max(ratios):.3f}x "
            f"| {q.greedy_agreement:.0%} | {q.mean_kl:.5f} | {q.top1_agreement:.1%} | {q.perplexity:.3f} ({q.perplexity_delta:+.3f}) |"
        )

    # one fixed KV budget: f16's at the parallel above
    budget = kv_bytes["f16"]
    per_slot = {t: kv_bytes[t] / args.parallel for t in types}
    slots = {t: int(budget // per_slot[t]) for t in types}
    n = max(slots.values())
    pool = load_prompts(32)
    wide_job = {"prompts": [pool[i % len(pool)] for i in range(2 * n)], "max_tokens": args.max_tokens, "temperature": 0.0}
    workers = {t: Worker("engine", {**base, "parallel": slots[t], "kv_type": t}) for t in types}
    try:
        budget_runs = interleave([(t, lambda w=workers[t]: w.run(wide_job)) for t in types], args.budget_rounds)
    finally:
        for w in workers.values():
            w.close()
    print()
    print(f"Fixed KV budget {budget / 2**20:.1f} MiB (f16 at parallel {args.parallel}), {len(wide_job['prompts'])} prompts:")
    print("| KV type | slots that fit | vs f16 | tok/s (median) | per round | / f16 (median) |")
    print("|---|---:|---:|---:|---|---:|")
    for t in types:
        print(
            f"| {t} | {slots[t]} | {slots[t] / slots['f16']:.2f}x | {median(budget_runs[t]):.1f} | {each(budget_runs[t])} "
            f"| {median(budget_runs[t]) / median(budget_runs['f16']):.3f}x |"
        )
    return 0


def _quality(types: list[str], prompts: list[str], args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Quality against f16, measured alone after the timed rounds."""
    from nbollama import Engine
    from nbollama.bench import kv_quality

    with Engine.load(None, parallel=1, ctx=512, threads=args.threads) as engine:
        result = kv_quality(engine, prompts, kv_types=types, max_tokens=32, progress=False)
    print(result, file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(main())
