"""What asking for log-probabilities costs: the engine with ``logprobs=5`` against without.

16 prompts x 64 tokens, greedy, at parallel 8 (issue 20's workload). Each
setting runs in an engine worker process of its own; rounds alternate which
goes first; the table gives medians, the ratio and its range over rounds.

    python benchmarks/logprobs.py            # 5 rounds
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
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts)
    config = {"parallel": args.parallel, "ctx": 512, "threads": args.threads, "prefix_cache": False}
    print(
        f"{machine_line()}; prompts={len(prompts)} max_tokens={args.max_tokens} greedy "
        f"parallel={args.parallel} rounds={args.rounds}",
        flush=True,
    )
    plain_job = {"prompts": prompts, "max_tokens": args.max_tokens, "temperature": 0.0}
    asked_job = {**plain_job, "logprobs": args.logprobs}
    plain, asked = Worker("engine", dict(config)), Worker("engine", dict(config))
    try:
        runs = interleave(
            [("none", lambda: plain.run(plain_job)), (f"logprobs={args.logprobs}", lambda: asked.run(asked_job))],
            args.rounds,
        )
    finally:
        plain.close()
        asked.close()
    base, cost = runs["none"], runs[f"logprobs={args.logprobs}"]
    ratios = [c["tps"] / b["tps"] for b, c in zip(base, cost)]
    print()
    print("| setting | tok/s (median) | per round | / none (median) | range over rounds |")
    print("|---|---:|---|---:|---|")
    print(f"| none | {median(base):.1f} | {each(base)} | 1.00x | |")
    print(
        f"| logprobs={args.logprobs} | {median(cost):.1f} | {each(cost)} | "
        f"{median(cost) / median(base):.3f}x | {min(ratios):.3f}-{max(ratios):.3f}x |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
