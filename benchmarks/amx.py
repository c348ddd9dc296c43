"""llama.cpp's AMX path (with nbollama's fix) against the fallback the guard takes where it is unsafe.

* **Throughput**: the first 16 prompts of ``shared/bench/prompts.jsonl``, 64 tokens greedy, at
  parallel 1 and 8; the engine with the AMX buffer against the same engine with
  ``use_extra_bufts=False`` (``NBOLLAMA_AMX=off``).
* **Choices**: 400 short reviews scored as positive/negative (``benchmarks/structured.py``'s
  workload), parallel 8, prompts/s.
* **Quality** (``--quality``): ``kv_quality``'s method, AMX path against the fallback on the same
  tokens. Teacher forcing over each prompt plus the fallback's greedy continuation: mean and max KL
  divergence over the whole vocabulary, top-1 agreement; and a reference text's perplexity.

Each setting runs in its own process; rounds alternate; medians, and ratios with their range over
rounds. Needs a llama-cpp-python whose AMX path the guard finds safe (``python -m nbollama.amx``).

    python benchmarks/amx.py                 # throughput and choices, 3 rounds
    python benchmarks/amx.py --quality       # the quality figures only
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
from _harness import Worker, each, interleave, load_prompts, machine_line, median
from structured import LABELS, reviews


def ratio(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> str:
    ratios = [x[key] / y[key] for x, y in zip(a, b)]
    return f"{median(a, key) / median(b, key):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"


def prompts_per_second(run: dict[str, float], n: int) -> dict[str, float]:
    return {**run, "pps": n / run["wall"]}


def speed(args: argparse.Namespace) -> None:
    prompts = load_prompts(16)
    job = {"prompts": prompts, "max_tokens": 64, "temperature": 0.0}
    labels = reviews(400)
    choices_job = {"prompts": labels, "choices": LABELS}
    workers: dict[str, Worker] = {}
    for amx in ("on", "off"):
        for n in args.parallel:
            workers[f"parallel={n} AMX {amx}"] = Worker(
                "engine",
                {"parallel": n, "ctx": 1024, "threads": args.threads, "prefix_cache": False,
                 "amx": None if amx == "on" else "off"},  # "on": as the guard decides (it must find AMX safe)
            )
    try:
        decided = {name: w.info["summary"].split("; AMX: ")[-1][:60] for name, w in workers.items()}
        print("AMX decision per worker:", decided, flush=True)
        for w in workers.values():
            if max(args.parallel) == w.info["parallel"]:
                w.run({**choices_job, "prompts": labels[:8]})  # llguidance-free warm-up of the choices path
        setups = [(name, lambda w=w: w.run(job)) for name, w in workers.items()]
        widest = max(args.parallel)
        for amx in ("on", "off"):
            w = workers[f"parallel={widest} AMX {amx}"]
            setups.append((f"choices AMX {amx}", lambda w=w: prompts_per_second(w.run(choices_job), len(labels))))
        runs = interleave(setups, args.rounds)
    finally:
        for w in workers.values():
            w.close()
    print()
    print("| setting | tokens/s (median) | per round | AMX on / off (range) |")
    print("|---|---:|---|---|")
    for n in args.parallel:
        on, off = runs[f"parallel={n} AMX on"], runs[f"parallel={n} AMX off"]
        print(f"| parallel {n}, AMX on | {median(on):.1f} | {each(on)} | {ratio(on, off, 'tps')} |")
        print(f"| parallel {n}, AMX off (use_extra_bufts=False) | {median(off):.1f} | {each(off)} | |")
    on, off = runs["choices AMX on"], runs["choices AMX off"]
    print(f"| choices, 400 reviews, parallel {widest}, AMX on (prompts/s) | {median(on, 'pps'):.1f} | "
          f"{each(on, 'pps')} | {ratio(on, off, 'pps')} |")
    print(f"| choices, 400 reviews, parallel {widest}, AMX off (prompts/s) | {median(off, 'pps'):.1f} | "
          f"{each(off, 'pps')} | |")


def quality(args: argparse.Namespace) -> None:
    """Both paths in this one process (the guard must find AMX safe); the fallback is the reference."""
    from nbollama import Engine, amx
    from nbollama._api.sweep import DEFAULT_PROMPTS
    from nbollama._core._kvprobe import KVCacheType, Scorer
    from nbollama._core._llama import LlamaModel
    from nbollama._kvquality import REFERENCE_TEXT
    from nbollama.models import default_model_path

    decision = amx.decide()
    if decision.state != "on":
        raise SystemExit(f"the AMX path is not in use here: {decision.line}")
    path = default_model_path()
    prompts = list(DEFAULT_PROMPTS[:8])
    os.environ["NBOLLAMA_AMX"] = "off"
    amx.reset()
    with Engine.load(path, parallel=8, ctx=512, reproducible=True) as fallback_engine:
        results = fallback_engine.generate(prompts, max_tokens=32, temperature=0.0)
        sequences = [(fallback_engine.tokenize(p), list(r.token_ids)) for p, r in zip(prompts, results)]
        reference = fallback_engine.tokenize(REFERENCE_TEXT)[:512]
    os.environ.pop("NBOLLAMA_AMX")
    amx.reset()
    models = {
        "AMX": LlamaModel(path, gpu_layers=0, use_extra_bufts=True),
        "fallback": LlamaModel(path, gpu_layers=0, use_extra_bufts=False),
    }
    scorers = {k: Scorer(m, KVCacheType(), ctx=512, threads=args.threads) for k, m in models.items()}
    kl: list[float] = []
    top1: list[bool] = []
    for prompt_ids, generated in sequences:
        sequence = (prompt_ids + generated)[:512]
        rows_from = len(prompt_ids) - 1
        base = scorers["fallback"].score(sequence, rows_from).rows
        rows = scorers["AMX"].score(sequence, rows_from).rows
        p = np.exp(base.astype(np.float64))
        kl.extend((p * (base - rows)).sum(axis=1).tolist())
        top1.extend((rows.argmax(axis=1) == base.argmax(axis=1)).tolist())
    ppl = {k: math.exp(-s.score(reference).token_logprobs.mean()) for k, s in scorers.items()}
    for s in scorers.values():
        s.close()
    for m in models.values():
        m.close()
    print(f"{machine_line()}; {len(prompts)} prompts + 32 greedy tokens each (teacher-forced), "
          f"reference text {len(reference)} tokens; the fallback (use_extra_bufts=False) is the reference")
    print("| measure | AMX path against the fallback |")
    print("|---|---:|")
    print(f"| mean KL divergence (nats, {len(kl)} positions) | {np.mean(kl):.5f} |")
    print(f"| max KL divergence | {np.max(kl):.4f} |")
    print(f"| top-1 agreement | {np.mean(top1):.1%} |")
    print(f"| reference perplexity: AMX / fallback | {ppl['AMX']:.2f} / {ppl['fallback']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quality", action="store_true", help="measure quality instead of speed")
    args = parser.parse_args(argv)
    from nbollama import amx

    print(f"{machine_line()}; {amx.cpu_model()}; rounds={args.rounds}; each setting in its own process", flush=True)
    print(amx.decide().line, flush=True)
    (quality if args.quality else speed)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
