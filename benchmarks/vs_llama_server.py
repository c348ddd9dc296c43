"""The engine against llama.cpp's llama-server, built from the same llama.cpp llama-cpp-python vendors.

For each N: ``llama-server -np N`` with N client threads over HTTP
(``/completion``, not streamed: the server's cheapest mode) against the engine
at ``parallel=N``, on the first 16 prompts of ``shared/bench/prompts.jsonl``,
64 tokens, greedy, the same context per slot and threads. Each system runs in
its own process (the server, and an engine worker); rounds alternate which
goes first; the table gives medians and the ratio engine / server.

    python -m nbollama.llama_server build        # once (about 8 minutes)
    python benchmarks/vs_llama_server.py         # N = 1 4 8 16, 5 rounds
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from _harness import Run, Worker, each, interleave, load_prompts, machine_line, median, server_run

from nbollama.llama_server import LlamaServer, find_binary
from nbollama.sources import resolve_model


def server_run_of(url: str, prompts: list[str], max_tokens: int, clients: int) -> Run:
    """N client threads, each taking the next prompt when its last one is answered."""
    bodies = [
        {"prompt": p, "n_predict": max_tokens, "temperature": 0.0, "cache_prompt": False} for p in prompts
    ]
    return server_run(url, bodies, clients)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ctx", type=int, default=1024, help="context per slot, for both")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)

    binary = find_binary()
    if binary is None:
        raise SystemExit("llama-server is not built: run `python -m nbollama.llama_server build` first")
    model = resolve_model(args.model)
    prompts = load_prompts(args.prompts)
    print(
        f"{machine_line()}; {binary}; prompts={len(prompts)} max_tokens={args.max_tokens} greedy "
        f"threads={args.threads} ctx/slot={args.ctx} rounds={args.rounds}",
        flush=True,
    )
    table: list[tuple[int, list[Run], list[Run]]] = []
    for n in args.parallel:
        print(f"N={n}", file=sys.stderr, flush=True)
        server = LlamaServer(
            model,
            ["-np", str(n), "-c", str(args.ctx * n), "-t", str(args.threads), "-tb", str(args.threads),
             "-b", "512", "-ub", "512"],
        ).start()
        worker = Worker(
            "engine",
            # no prefix cache: the server runs without cache_prompt, and rounds repeat the prompts
            {"model": args.model, "parallel": n, "ctx": args.ctx, "threads": args.threads, "prefix_cache": False},
        )
        try:
            server_run_of(server.url, prompts[:n], 4, n)  # warm up
            job: dict[str, Any] = {"prompts": prompts, "max_tokens": args.max_tokens, "temperature": 0.0}
            runs = interleave(
                [
                    ("engine", lambda w=worker, j=job: w.run(j)),
                    ("server", lambda u=server.url, c=n: server_run_of(u, prompts, args.max_tokens, c)),
                ],
                args.rounds,
            )
        finally:
            worker.close()
            server.stop()
        table.append((n, runs["engine"], runs["server"]))

    print()
    print(
        "| N | llama-server tok/s (median) | per round | engine tok/s (median) | per round "
        "| engine / server (median) | range over rounds |"
    )
    print("|---:|---:|---|---:|---|---:|---|")
    for n, engine_runs, server_runs in table:
        e, s = median(engine_runs), median(server_runs)
        # each round ran both systems back to back: its ratio shares that round's machine state
        ratios = [a["tps"] / b["tps"] for a, b in zip(engine_runs, server_runs)]
        print(
            f"| {n} | {s:.1f} | {each(server_runs)} | {e:.1f} | {each(engine_runs)} | {e / s:.2f}x "
            f"| {min(ratios):.2f}-{max(ratios):.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
