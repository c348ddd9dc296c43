"""What nbollama's remote engine costs: the same prompts against one llama-server, through nbollama and bare httpx.

One ``llama-server -np 4`` (built from the llama.cpp llama-cpp-python
vendors), the first 16 prompts of ``shared/bench/prompts.jsonl``, 64 tokens,
greedy. Two clients of it, alternating every round:

* **nbollama**: ``nbollama.connect(url).generate(prompts)``, i.e. the remote
  engine with its in-flight limit (4, the server's slots), its queue, one
  event-loop thread, SSE parsed by httpx-sse, every token published to a
  ``Handle``;
* **bare httpx**: 4 threads, each taking the next prompt when its last one is
  answered, streaming the same ``/completion`` request (same body:
  ``stream``, ``cache_prompt``, ``return_progress``, one connection per
  request) and reading each event's JSON: the least a streaming client does.

Both stream, so the server does the same work; what differs is the client.
The table gives the median tokens/s over rounds (every round's figure too),
the mean TTFT and the client process's CPU seconds per run, and nbollama's
overhead: 1 - nbollama / bare.

    python -m nbollama.llama_server build     # once (about 8 minutes)
    python benchmarks/remote.py               # 16 prompts, 64 tokens, 5 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time

import httpx
from _harness import Run, each, interleave, load_prompts, machine_line, median

import nbollama.remote
from nbollama.llama_server import LlamaServer, find_binary
from nbollama.sources import resolve_model


def body(prompt: str, max_tokens: int) -> dict[str, object]:
    """The request nbollama's llama-server adapter sends for a greedy prompt (see ``_adapters.py``)."""
    return {
        "prompt": prompt,
        "n_predict": max_tokens,
        "stream": True,
        "cache_prompt": True,
        "return_progress": True,
        "temperature": 0.0,
    }


def bare_run(clients: list[httpx.Client], prompts: list[str], max_tokens: int) -> Run:
    """One thread per client (made once, like the engine's), streaming ``/completion`` and reading every event."""
    todo: queue.Queue[str] = queue.Queue()
    for prompt in prompts:
        todo.put(prompt)
    tokens: list[int] = []
    ttfts: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    cpu = time.process_time()

    def client(http: httpx.Client) -> None:
        while True:
            try:
                prompt = todo.get_nowait()
            except queue.Empty:
                return
            sent = time.perf_counter()
            first = None
            predicted = 0
            with http.stream(
                "POST",
                "/completion",
                json=body(prompt, max_tokens),
                headers={"Connection": "close"},
            ) as response:
                if response.status_code != 200:
                    errors.append(response.read().decode(errors="replace"))
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if "prompt_progress" in event:
                        continue
                    if first is None and event.get("tokens_predicted"):
                        first = time.perf_counter()
                    predicted = event.get("tokens_predicted", predicted)
                    if event.get("stop"):
                        break
            tokens.append(int(predicted))
            if first is not None:
                ttfts.append(first - sent)

    threads = [
        threading.Thread(target=client, args=(http,), name=f"bare-client-{i}")
        for i, http in enumerate(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"llama-server answered with an error: {errors[0][:300]}")
    return {
        "tokens": float(sum(tokens)),
        "wall": wall,
        "tps": sum(tokens) / wall,
        "ttft": sum(ttfts) / len(ttfts) if ttfts else float("nan"),
        "cpu": time.process_time() - cpu,
    }


def nbollama_run(engine: nbollama.remote.RemoteEngine, prompts: list[str], max_tokens: int) -> Run:
    """The remote engine's ``generate``: every prompt queued at once, ``max_inflight`` of them sent."""
    started = time.perf_counter()
    cpu = time.process_time()
    handles = engine.submit_many(prompts, max_tokens=max_tokens, temperature=0.0)
    results = [h.result() for h in handles]
    wall = time.perf_counter() - started
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"nbollama: {bad[0].error}")
    ttfts = [h.ttft_from_send for h in handles if h.ttft_from_send is not None]
    tokens = sum(r.completion_tokens for r in results)
    return {
        "tokens": float(tokens),
        "wall": wall,
        "tps": tokens / wall,
        "ttft": sum(ttfts) / len(ttfts) if ttfts else float("nan"),
        "cpu": time.process_time() - cpu,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--parallel", type=int, default=4, help="llama-server -np, and the clients of each"
    )
    parser.add_argument("--ctx", type=int, default=1024, help="context per slot")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)

    binary = find_binary()
    if binary is None:
        raise SystemExit(
            "llama-server is not built: run `python -m nbollama.llama_server build` first"
        )
    model = resolve_model(args.model)
    prompts = load_prompts(args.prompts)
    print(
        f"{machine_line()}; {binary}; llama-server -np {args.parallel}; prompts={len(prompts)} "
        f"max_tokens={args.max_tokens} greedy threads={args.threads} ctx/slot={args.ctx} rounds={args.rounds}",
        flush=True,
    )
    server = LlamaServer(
        model,
        [
            "-np",
            str(args.parallel),
            "-c",
            str(args.ctx * args.parallel),
            "-t",
            str(args.threads),
            "-tb",
            str(args.threads),
        ],
    ).start()
    engine = nbollama.remote.connect(server.url, max_inflight=args.parallel)
    clients = [httpx.Client(base_url=server.url, timeout=600) for _ in range(args.parallel)]
    try:
        print(engine.summary, file=sys.stderr, flush=True)
        bare_run(clients, prompts[: args.parallel], 4)  # warm up both
        nbollama_run(engine, prompts[: args.parallel], 4)
        runs = interleave(
            [
                ("nbollama", lambda: nbollama_run(engine, prompts, args.max_tokens)),
                ("bare httpx", lambda: bare_run(clients, prompts, args.max_tokens)),
            ],
            args.rounds,
        )
    finally:
        for http in clients:
            http.close()
        engine.close()
        server.stop()

    ours, bare = median(runs["nbollama"]), median(runs["bare httpx"])
    print()
    print("| client | tok/s (median) | per round | mean TTFT s | client CPU s per run |")
    print("|---|---:|---|---:|---:|")
    for name in ("bare httpx", "nbollama"):
        print(
            f"| {name} | {median(runs[name]):.1f} | {each(runs[name])} | "
            f"{median(runs[name], 'ttft'):.2f} | {median(runs[name], 'cpu'):.2f} |"
        )
    print()
    print(
        f"nbollama / bare = {ours / bare:.3f}: overhead {100 * (1 - ours / bare):+.1f}% of throughput"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
