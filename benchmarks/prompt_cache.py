"""What keeping prompts in host RAM costs, and what it saves.

The shipped generation task's 30 questions (``examples/data/gen.jsonl``), each behind 3 examples drawn
from ``gen_train.jsonl`` as lm-eval draws few-shot examples (other ones for each question), about 56
tokens a prompt, 8 greedy tokens each, parallel 8: more prompts than slots, so the slots' own caches
hold only the last eight. Two engines, each in its own process:
``cache_ram=1024`` (the default) and ``cache_ram=0``. Each round runs the cell twice on each:

* **first run**: nothing to reuse; every slot a new prompt takes is saved first. The cost is the
  ratio of the two engines' tokens/s;
* **run again**: the same cell; the engine with the cache writes every prompt back from RAM, the
  other finds eight in its slots. The gain is the ratio of their wall times.

Every round's prompts start with the round's number, so nothing carries over from one round to the
next; rounds alternate which engine goes first.

    python benchmarks/prompt_cache.py              # 3 rounds
    python benchmarks/prompt_cache.py --rounds 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys

from _harness import REPO, Run, Worker, each, interleave, machine_line, median

DATA = REPO / "examples" / "data"


def few_shot_prompts(shots: int = 3, seed: int = 1234) -> list[str]:
    """Each question of the shipped generation task behind ``shots`` examples of its own."""
    train, test = (
        [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
        for name in ("gen_train.jsonl", "gen.jsonl")
    )
    draw = random.Random(seed)
    ask = "Q: What is the capital of {country}?\nA:"
    return [
        "".join(ask.format(**d) + f" {d['capital']}\n\n" for d in draw.sample(train, shots)) + ask.format(**q)
        for q in test
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    base = few_shot_prompts()
    config = {"parallel": args.parallel, "ctx": 1024, "threads": args.threads}
    print(f"{machine_line()}; prompts={len(base)} max_tokens={args.max_tokens} greedy parallel={args.parallel} "
          f"rounds={args.rounds}; each engine in its own process", flush=True)
    workers = {ram: Worker("engine", {**config, "cache_ram": ram}) for ram in (1024, 0)}
    rounds = itertools.count()
    again: dict[int, list[Run]] = {1024: [], 0: []}

    def cell(ram: int) -> Run:
        number = next(rounds) // 2  # both engines of a round get the same prompts
        job = {"prompts": [f"({number}) {p}" for p in base], "max_tokens": args.max_tokens, "temperature": 0.0}
        first = workers[ram].run(job)
        again[ram].append(workers[ram].run(job))
        return first

    try:
        runs = interleave([("cache_ram=1024", lambda: cell(1024)), ("cache_ram=0", lambda: cell(0))], args.rounds)
    finally:
        for w in workers.values():
            w.close()
    on, off = runs["cache_ram=1024"], runs["cache_ram=0"]
    cost = [a["tps"] / b["tps"] for a, b in zip(on, off)]
    gain = [b["wall"] / a["wall"] for a, b in zip(again[1024], again[0])]
    print()
    print("| the cell | cache_ram=1024 | cache_ram=0 | ratio (range over rounds) |")
    print("|---|---|---|---|")
    print(f"| first run, tok/s (median; rounds) | {median(on):.1f} ({each(on)}) | {median(off):.1f} ({each(off)}) "
          f"| {median(on) / median(off):.3f}x ({min(cost):.3f}-{max(cost):.3f}x) |")
    print(f"| run again, wall s | {median(again[1024], 'wall'):.2f} ({each(again[1024], 'wall', '{:.2f}')}) | "
          f"{median(again[0], 'wall'):.2f} ({each(again[0], 'wall', '{:.2f}')}) | "
          f"**{median(again[0], 'wall') / median(again[1024], 'wall'):.2f}x** faster "
          f"({min(gain):.2f}-{max(gain):.2f}x) |")
    print(f"| run again, prompt tokens reused (median) | {statistics.median(r['cached_tokens'] for r in again[1024]):.0f} "
          f"| {statistics.median(r['cached_tokens'] for r in again[0]):.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
