"""What a big cell's display costs: a 1,000-prompt ``%%generate --lines`` cell vs ``engine.generate()``.

Each system runs in a real IPython kernel of its own (``jupyter_client``),
loaded once with the same engine (bundled model, ``parallel`` 8, ctx 128):

* **cell**: the ``%%generate --lines`` cell over the prompts, its compact
  progress view sent over IOPub and read here, as a frontend would;
* **generate**: ``engine.generate(prompts)`` on the same prompts, no display.

Rounds alternate the order (cell, generate, generate, cell, ...), so drift
in a shared machine's speed falls on both; medians are reported with every
round's figure. Elapsed time is measured inside the kernel, around the cell
or the call. Also reported: the display messages of the cell (how many, the
largest) and the size of what the notebook would store (the final display
and the cell's value).

    python benchmarks/big_cell.py [--prompts 1000] [--max-tokens 4] [--rounds 3] [--parallel 8]

Target: the display costs at most 10% of the elapsed time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

__all__ = ["prompts_for", "Kernel", "main"]


def prompts_for(n: int) -> list[str]:
    """``n`` short, distinct prompts (one line each, as ``--lines`` wants them)."""
    return [f"Item {i}: a short note about the number {i}." for i in range(n)]


class Kernel:
    """One IPython kernel with an engine loaded; ``run(code)`` executes and reads its IOPub."""

    def __init__(self, parallel: int, ctx: int) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3")
        self.run(
            "%load_ext nbollama\n"
            f"%nbollama load --parallel {parallel} --ctx {ctx}\n"
            "import time, json\nfrom nbollama import current_engine\n"
            "current_engine().generate(['Warm up.'] * 8, max_tokens=4, temperature=0)"
        )

    def run(self, code: str) -> dict[str, Any]:
        """Execute ``code``; its stdout, and per display message its type and size in bytes."""
        msg_id = self.kc.execute(code)
        out: list[str] = []
        displays: list[dict[str, Any]] = []
        value_bytes = 0
        while True:
            msg = self.kc.get_iopub_msg(timeout=1800)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out.append(content["text"])
            elif kind in ("display_data", "update_display_data"):
                displays.append({"type": kind, "bytes": len(json.dumps(content))})
            elif kind == "execute_result":
                value_bytes = len(json.dumps(content["data"]))
            elif kind == "error":
                raise SystemExit(
                    "the benchmark failed in the kernel:\n" + "\n".join(content["traceback"])
                )
            elif kind == "status" and content["execution_state"] == "idle":
                break
        return {"stdout": "".join(out), "displays": displays, "value_bytes": value_bytes}

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def _elapsed(stdout: str) -> float:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("ELAPSED "))
    return float(line.split()[1])


def run_cell(kernel: Kernel, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    body = "\n".join(prompts)
    code = (
        "t0 = time.perf_counter()\n"
        f"_big = get_ipython().run_cell_magic('generate', '--lines --max-tokens {max_tokens} --temperature 0 --out big', {body!r})\n"
        "print('ELAPSED', time.perf_counter() - t0)\n"
        "print('TOKENS', big.completion_tokens)\n"
        "_big"
    )
    answer = kernel.run(code)
    sizes = [d["bytes"] for d in answer["displays"]]
    return {
        "elapsed": _elapsed(answer["stdout"]),
        "messages": len(sizes),
        "max_message": max(sizes) if sizes else 0,
        "sent_bytes": sum(sizes),
        # what a notebook keeps: the display's last state and the cell's value
        "stored": (sizes[-1] if sizes else 0) + answer["value_bytes"],
    }


def run_generate(kernel: Kernel, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    code = (
        f"_prompts = {prompts!r}\n"
        "t0 = time.perf_counter()\n"
        f"_direct = current_engine().generate(_prompts, max_tokens={max_tokens}, temperature=0)\n"
        "print('ELAPSED', time.perf_counter() - t0)\n"
    )
    return {"elapsed": _elapsed(kernel.run(code)["stdout"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=1000, help="how many prompts")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both systems")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128, help="context per slot")
    args = parser.parse_args(argv)
    prompts = prompts_for(args.prompts)
    started = time.perf_counter()
    cell_kernel = Kernel(args.parallel, args.ctx)
    generate_kernel = Kernel(args.parallel, args.ctx)
    runs: dict[str, list[dict[str, Any]]] = {"cell": [], "generate": []}
    try:
        for round_ in range(args.rounds):
            order = ("cell", "generate") if round_ % 2 == 0 else ("generate", "cell")
            for name in order:
                if name == "cell":
                    runs[name].append(run_cell(cell_kernel, prompts, args.max_tokens))
                else:
                    runs[name].append(run_generate(generate_kernel, prompts, args.max_tokens))
            print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        cell_kernel.close()
        generate_kernel.close()
    cell = statistics.median(r["elapsed"] for r in runs["cell"])
    direct = statistics.median(r["elapsed"] for r in runs["generate"])
    pairs = [c["elapsed"] / g["elapsed"] for c, g in zip(runs["cell"], runs["generate"])]
    last = runs["cell"][-1]
    print(
        f"{args.prompts} prompts x max_tokens {args.max_tokens}, greedy, parallel {args.parallel}, "
        f"ctx {args.ctx}, {args.rounds} alternating rounds, each system in its own kernel"
    )
    for name, median in (("%%generate cell", cell), ("engine.generate()", direct)):
        key = "cell" if name.startswith("%") else "generate"
        each = ", ".join(f"{r['elapsed']:.2f}" for r in runs[key])
        print(f"  {name:<18} {median:6.2f} s median (rounds: {each})")
    print(
        f"  display overhead: {100 * (cell / direct - 1):+.1f}% on medians; per-round ratios "
        f"{', '.join(f'{p:.3f}' for p in pairs)} (median {statistics.median(pairs):.3f}); target <= +10%"
    )
    print(
        f"  cell display: {last['messages']} messages, largest {last['max_message'] / 1024:.1f} KiB, "
        f"{last['sent_bytes'] / 1024:.0f} KiB sent in all; stored output {last['stored'] / 1024:.1f} KiB"
    )
    print(f"  wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
