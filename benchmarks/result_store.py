"""What the result store costs, and what replaying saves.

A 1,000-prompt cell (short reviews, 4 greedy tokens each, parallel 8, reproducible mode):

* **writing**: the cell with an empty store (every result written as it ends) against the same
  cell with ``cache=False``; each in its own process, rounds alternating, a new empty store every
  round. The overhead is the ratio of their wall times.
* **replaying**: the same cell again on the full store: every result comes back from it. The
  engine part (``generate()`` returning) and the rendering (the ``Results`` table a cell shows) are
  timed apart.

    python benchmarks/result_store.py                # 1,000 prompts, 3 rounds
    python benchmarks/result_store.py --prompts 200 --rounds 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from _harness import Worker, each, interleave, machine_line, median
from structured import reviews


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    # every prompt distinct (the templates repeat every 200): a repeat would be replayed, not written
    prompts = [f"Row {i}. {review}" for i, review in enumerate(reviews(args.prompts))]
    base = {"prompts": prompts, "max_tokens": 4, "temperature": 0.0}
    config = {"parallel": 8, "ctx": 256, "threads": args.threads, "reproducible": True}
    print(f"{machine_line()}; prompts={len(prompts)} max_tokens=4 greedy parallel=8 reproducible "
          f"rounds={args.rounds}; each setting in its own process", flush=True)
    scratch = tempfile.mkdtemp(prefix="nbollama-bench-store-")
    stores = iter(range(10_000))
    workers = {"no store": Worker("engine", dict(config)), "store": Worker("engine", dict(config))}
    replays: list[dict[str, float]] = []

    def with_store() -> dict[str, float]:
        folder = os.path.join(scratch, f"round-{next(stores)}")  # empty: every result is written
        run = workers["store"].run({**base, "cache": "auto", "store_dir": folder})
        replay = workers["store"].run({**base, "cache": "auto", "store_dir": folder, "render": True})
        replays.append(replay)
        return run

    try:
        runs = interleave(
            [("no store", lambda: workers["no store"].run({**base, "cache": False})), ("store", with_store)],
            args.rounds,
        )
    finally:
        for w in workers.values():
            w.close()
    ratios = [s["wall"] / n["wall"] for s, n in zip(runs["store"], runs["no store"])]
    overhead = median(runs["store"], "wall") / median(runs["no store"], "wall") - 1
    print()
    print("| the cell | wall s (median) | per round | vs no store (range) |")
    print("|---|---:|---|---|")
    print(f"| cache=False | {median(runs['no store'], 'wall'):.2f} | {each(runs['no store'], 'wall', '{:.2f}')} | |")
    print(f"| empty store (writes every result) | {median(runs['store'], 'wall'):.2f} | "
          f"{each(runs['store'], 'wall', '{:.2f}')} | {overhead:+.1%} ({min(ratios) - 1:+.1%} to {max(ratios) - 1:+.1%}) |")
    print(f"| full store, replayed: the engine part | {median(replays, 'wall'):.3f} | {each(replays, 'wall', '{:.3f}')} | |")
    print(f"| full store, replayed: rendering the Results | {median(replays, 'render'):.4f} | "
          f"{each(replays, 'render', '{:.4f}')} | |")
    print(f"replayed rows per replay run: {', '.join(str(int(r['replayed'])) for r in replays)} of {len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
