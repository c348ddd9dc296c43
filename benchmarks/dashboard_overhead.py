"""What a live dashboard costs the engine: aggregate throughput with one attached vs without.

Same engine, same prompts (the first 16 of the shared benchmark set), greedy,
``max_tokens=64``, ``parallel=4``. The two conditions alternate
(without, with, with, without, ...) so drift in a shared machine's load falls
on both equally. By default the measurement runs inside a real IPython kernel
(started with ``jupyter_client``) and the dashboard is displayed there, so its
widget updates are serialised and sent over IOPub to this process, which reads
them like a frontend would; ``--no-kernel`` measures in this process instead.

    python benchmarks/dashboard_overhead.py [--prompts PATH] [--rounds 3]

Target: the dashboard costs less than 5% of throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["load_prompts", "measure", "main"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_PROMPTS = [
    Path("/work/shared/bench/prompts.jsonl"),
    REPO.parent / "shared" / "bench" / "prompts.jsonl",
]


def load_prompts(path: Path | None, n: int) -> list[str]:
    """The first ``n`` prompts of a JSONL file with one ``{"prompt": ...}`` per line."""
    candidates = [path] if path is not None else DEFAULT_PROMPTS
    for candidate in candidates:
        if candidate is not None and candidate.exists():
            lines = [line for line in candidate.read_text().splitlines() if line.strip()]
            prompts = [json.loads(line)["prompt"] for line in lines[:n]]
            if len(prompts) < n:
                raise SystemExit(f"{candidate} has only {len(prompts)} prompts, {n} asked")
            return prompts
    raise SystemExit(
        f"no prompts file found (tried {', '.join(map(str, candidates))}); pass --prompts"
    )


def _thread_cpu(names: tuple[str, ...]) -> float:
    """CPU seconds used so far by this process's threads whose name starts with one of ``names``."""
    import psutil

    ids = {t.native_id for t in threading.enumerate() if t.name.startswith(names)}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def _process_cpu() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def measure(
    prompts: list[str],
    *,
    rounds: int = 3,
    max_tokens: int = 64,
    parallel: int = 4,
    ctx: int = 512,
    model: str | None = None,
    display: bool = False,
) -> dict[str, Any]:
    """Alternate runs without and with a live dashboard.

    Per run: generated tokens/s (wall clock, sensitive to anything else on
    the machine) and the CPU seconds of the threads a dashboard makes busy
    (the engine's monitor thread, which takes the snapshots and runs the
    widget updates, and the kernel's IOPub thread, which sends them), next to
    the whole process's CPU seconds: a cost that other load cannot blur.
    """
    from nbollama import Engine
    from nbollama.widgets import dashboard

    runs: dict[str, list[float]] = {"without": [], "with": []}
    tokens: dict[str, list[int]] = {"without": [], "with": []}
    view_cpu: dict[str, list[float]] = {"without": [], "with": []}
    process_cpu: dict[str, list[float]] = {"without": [], "with": []}
    updates: list[int] = []
    update_cpu: list[float] = []  # CPU seconds in the widget updates alone (snapshots excluded)
    with Engine.load(model, parallel=parallel, ctx=ctx) as engine:
        engine.generate(
            prompts[:parallel], max_tokens=8, temperature=0.0
        )  # warm-up: first decode, page cache
        watched = (f"nbollama-monitor-{engine.id}", "IOPub")

        def run(with_dashboard: bool) -> None:
            board = dashboard(engine) if with_dashboard else None
            spent = [0.0]
            if board is not None:
                show_snapshot = board._link._on_snapshot

                def timed(snapshot: Any) -> None:
                    started = time.thread_time()
                    show_snapshot(snapshot)
                    spent[0] += time.thread_time() - started

                board._link._on_snapshot = timed  # type: ignore[method-assign]
                if display:
                    from IPython.display import display as show

                    show(board)
            time.sleep(0.3)  # let the first render settle; the engine is idle meanwhile
            cpu0, views0 = _process_cpu(), _thread_cpu(watched)
            started = time.perf_counter()
            results = engine.generate(prompts, max_tokens=max_tokens, temperature=0.0)
            elapsed = time.perf_counter() - started
            cpu1, views1 = _process_cpu(), _thread_cpu(watched)
            generated = sum(r.completion_tokens for r in results)
            key = "with" if with_dashboard else "without"
            runs[key].append(generated / elapsed)
            tokens[key].append(generated)
            view_cpu[key].append(views1 - views0)
            process_cpu[key].append(cpu1 - cpu0)
            if board is not None:
                updates.append(board.updates)
                update_cpu.append(spent[0])
                board.close()

        for i in range(rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            for with_dashboard in order:
                run(with_dashboard)
        summary = engine.summary
    without, with_ = statistics.mean(runs["without"]), statistics.mean(runs["with"])
    extra = sum(view_cpu["with"]) - sum(view_cpu["without"])
    return {
        "engine": summary,
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "rounds": rounds,
        "runs": runs,
        "tokens": tokens,
        "dashboard_updates_per_run": updates,
        "throughput_without": without,
        "throughput_with": with_,
        "ratio": with_ / without,
        "median_ratio": statistics.median(runs["with"]) / statistics.median(runs["without"]),
        # each round's two runs are back to back: their ratio is the least drifted one
        "pair_ratios": [w / wo for w, wo in zip(runs["with"], runs["without"])],
        "view_threads_cpu": view_cpu,
        "process_cpu": process_cpu,
        "cpu_share": extra / sum(process_cpu["with"]),
        "ms_per_update": 1000 * sum(view_cpu["with"]) / max(1, sum(updates)),
        "ms_per_widget_update": 1000 * sum(update_cpu) / max(1, sum(updates)),
    }


def _measure_in_kernel(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    """Run ``measure`` in a fresh IPython kernel, reading its IOPub like a frontend."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        call = (
            f"import json, runpy\nns = runpy.run_path({str(Path(__file__).resolve())!r})\n"
            f"result = ns['measure']({prompts!r}, rounds={args.rounds}, max_tokens={args.max_tokens}, "
            f"parallel={args.parallel}, ctx={args.ctx}, model={args.model!r}, display=True)\n"
            "print('RESULT ' + json.dumps(result))"
        )
        msg_id = kc.execute(call)
        out: list[str] = []
        comm_msgs = comm_bytes = 0
        while True:
            msg = kc.get_iopub_msg(timeout=1800)
            if msg["parent_header"].get("msg_id") != msg_id and msg["msg_type"] != "comm_msg":
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "comm_msg":
                comm_msgs += 1
                comm_bytes += len(json.dumps(content))
            elif kind == "stream":
                out.append(content["text"])
            elif kind == "error":
                raise SystemExit(
                    "the benchmark failed in the kernel:\n" + "\n".join(content["traceback"])
                )
            elif kind == "status" and content["execution_state"] == "idle":
                break
        text = "".join(out)
        line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit("no result from the kernel:\n" + text)
        result: dict[str, Any] = json.loads(line[len("RESULT ") :])
        result["iopub_comm_msgs"] = comm_msgs
        result["iopub_comm_bytes"] = comm_bytes
        return result
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="JSONL prompts file (default: shared/bench/prompts.jsonl)",
    )
    parser.add_argument("-n", type=int, default=16, help="how many prompts (first n)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both conditions")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=512, help="context per slot")
    parser.add_argument("--model", default=None, help="GGUF path (default: the bundled model)")
    parser.add_argument(
        "--no-kernel", action="store_true", help="measure in this process, not in a kernel"
    )
    args = parser.parse_args(argv)
    prompts = load_prompts(args.prompts, args.n)
    started = time.perf_counter()
    if args.no_kernel:
        result = measure(
            prompts,
            rounds=args.rounds,
            max_tokens=args.max_tokens,
            parallel=args.parallel,
            ctx=args.ctx,
            model=args.model,
        )
    else:
        result = _measure_in_kernel(args, prompts)
    print(result["engine"])
    where = (
        "in this process"
        if args.no_kernel
        else "in an IPython kernel, widget messages read over IOPub"
    )
    print(
        f"{result['prompts']} prompts x max_tokens {result['max_tokens']}, greedy, {result['rounds']} rounds, {where}"
    )
    for key in ("without", "with"):
        per_run = ", ".join(f"{v:.1f}" for v in result["runs"][key])
        print(
            f"  {key:>7} dashboard: {result[f'throughput_{key}']:.1f} tok/s (runs: {per_run}; tokens {result['tokens'][key]})"
        )
    print(f"  dashboard updates per run: {result['dashboard_updates_per_run']}")
    if "iopub_comm_msgs" in result:
        print(
            f"  widget comm messages over IOPub: {result['iopub_comm_msgs']} ({result['iopub_comm_bytes'] / 1024:.0f} KiB)"
        )
    print(
        f"  ratio with/without: {result['ratio']:.3f} on means, {result['median_ratio']:.3f} on medians "
        f"(wall-clock cost {100 * (1 - result['ratio']):+.1f}% / {100 * (1 - result['median_ratio']):+.1f}%, target < 5%)"
    )
    pairs = result["pair_ratios"]
    print(
        f"  per-round ratios: {', '.join(f'{r:.3f}' for r in pairs)}; "
        f"median {statistics.median(pairs):.3f} (cost {100 * (1 - statistics.median(pairs)):+.1f}%)"
    )
    print(
        f"  CPU: the dashboard's threads used {100 * result['cpu_share']:.2f}% of the process's CPU during the runs; "
        f"{result['ms_per_update']:.2f} ms per update ({result['ms_per_widget_update']:.2f} ms of it in the widgets, "
        "the rest the engine's snapshot and IOPub)"
    )
    print(f"  wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
