"""Structured outputs against free generation and against llama-server's grammar sampler.

* **Choices**: 400 short reviews, "positive" or "negative", parallel 8. The
  engine's ``choices=`` (scored from the prefill) against 2 greedy tokens
  unconstrained, and against ``llama-server -np 8`` with a grammar that allows
  only the two labels.
* **JSON**: a schema with an enum, a number and a short string array, up to
  64 tokens, parallel 8: the engine constrained against unconstrained, and
  against llama-server with ``json_schema``. A constrained answer ends when
  its JSON does (about 18 tokens here), so the unconstrained baseline
  generates as many tokens per prompt as the constrained answers' mean, measured in the warm-up;
  otherwise tok/s would compare prefill shares, not the cost of the masks.

Each system runs in its own process; rounds alternate the order; the tables
give medians and ratios with their range over rounds.

    python -m nbollama.llama_server build     # once
    python benchmarks/structured.py           # 3 rounds
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Any

from _harness import Run, Worker, each, interleave, machine_line, median, server_run

from nbollama.llama_server import LlamaServer, find_binary
from nbollama.models import resolve_model

LABELS = ["positive", "negative"]
GOOD = ["wonderful", "great", "lovely", "excellent", "fantastic", "superb", "delightful", "perfect", "charming", "brilliant"]
BAD = ["awful", "terrible", "boring", "broken", "dreadful", "useless", "disappointing", "horrible", "poor", "annoying"]
THINGS = ["film", "meal", "hotel", "phone", "book", "service", "concert", "game", "laptop", "course"]
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": LABELS},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["sentiment", "stars", "tags"],
    "additionalProperties": False,
}


def reviews(n: int) -> list[str]:
    """``n`` short reviews, half of them good, from templates (no download)."""
    words = itertools.cycle(
        [(a, t) for a, t in itertools.product(GOOD, THINGS)] + [(a, t) for a, t in itertools.product(BAD, THINGS)]
    )
    good_bad = [next(words) for _ in range(200)]
    picked = [good_bad[(i * 7) % len(good_bad)] for i in range(n)]
    return [
        f"Review: The {thing} was {adjective}, I would say so to anyone.\n"
        "Answer with exactly one word, positive or negative.\nSentiment:"
        for adjective, thing in picked
    ]


def with_pps(run: Run, n: int) -> Run:
    return {**run, "pps": n / run["wall"]}


def valid_json(text: str) -> bool:
    try:
        data = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(data, dict)
        and set(data) == {"sentiment", "stars", "tags"}
        and data["sentiment"] in LABELS
        and isinstance(data["stars"], int)
        and 1 <= data["stars"] <= 5
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=400)
    parser.add_argument("--json-prompts", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=512, help="context per slot, for both")
    parser.add_argument("--only", choices=["choices", "json"], help="run one of the two parts")
    args = parser.parse_args(argv)
    binary = find_binary()
    if binary is None:
        raise SystemExit("llama-server is not built: run `python -m nbollama.llama_server build` first")
    prompts = reviews(args.reviews)
    json_prompts = [p.replace("Sentiment:", "As JSON:") for p in prompts[: args.json_prompts]]
    n = args.parallel
    print(
        f"{machine_line()}; reviews={len(prompts)} json prompts={len(json_prompts)} parallel={n} "
        f"threads={args.threads} ctx/slot={args.ctx} rounds={args.rounds}",
        flush=True,
    )
    config = {"parallel": n, "ctx": args.ctx, "threads": args.threads, "prefix_cache": False}
    server = LlamaServer(
        resolve_model(None),
        ["-np", str(n), "-c", str(args.ctx * n), "-t", str(args.threads), "-tb", str(args.threads),
         "-b", "512", "-ub", "512"],
    ).start()
    choices_w, free_w, json_w = Worker("engine", dict(config)), Worker("engine", dict(config)), Worker("engine", dict(config))
    label_grammar = 'root ::= " positive" | " negative"'
    seen: dict[str, list[str]] = {}

    def engine(worker: Worker, job: dict[str, Any], name: str, count: int) -> Run:
        run = worker.run(job)
        seen[name] = run.pop("texts")  # type: ignore[arg-type]
        return with_pps(run, count)

    def on_server(bodies: list[dict[str, Any]], name: str) -> Run:
        run, texts = server_run(server.url, bodies, n)
        seen[name] = texts
        return run

    try:
        server_run(server.url, [{"prompt": "Warm up.", "n_predict": 2}], 1)
        choices_w.run({"prompts": prompts[:8], "choices": LABELS})
        warm = json_w.run({"prompts": json_prompts, "max_tokens": 64, "temperature": 0.0, "json_schema": SCHEMA})
        same_length = max(1, round(warm["tokens"] / len(json_prompts)))  # llguidance's tokenizer built
        free_w.run({"prompts": json_prompts, "max_tokens": same_length, "temperature": 0.0})
        label_bodies = [
            {"prompt": p, "n_predict": 8, "temperature": 0.0, "cache_prompt": False, "grammar": label_grammar}
            for p in prompts
        ]
        json_bodies = [
            {"prompt": p, "n_predict": 64, "temperature": 0.0, "cache_prompt": False, "json_schema": SCHEMA}
            for p in json_prompts
        ]
        setups = [
            ("choices", lambda: engine(choices_w, {"prompts": prompts, "choices": LABELS}, "choices", len(prompts))),
            ("2 tokens", lambda: engine(free_w, {"prompts": prompts, "max_tokens": 2, "temperature": 0.0}, "2 tokens", len(prompts))),
            ("server grammar", lambda: on_server(label_bodies, "server grammar")),
            ("json", lambda: engine(json_w, {"prompts": json_prompts, "max_tokens": 64, "temperature": 0.0, "json_schema": SCHEMA}, "json", len(json_prompts))),
            ("json free", lambda: engine(free_w, {"prompts": json_prompts, "max_tokens": same_length, "temperature": 0.0}, "json free", len(json_prompts))),
            ("server json_schema", lambda: on_server(json_bodies, "server json_schema")),
        ]
        parts = {"choices": setups[:3], "json": setups[3:]}
        runs = interleave(
            parts[args.only] if args.only else setups,
            args.rounds,
        )
    finally:
        for w in (choices_w, free_w, json_w):
            w.close()
        server.stop()

    if args.only != "json":
        report_choices(runs, seen, len(prompts))
    if args.only != "choices":
        report_json(runs, seen, len(json_prompts), same_length)
    return 0


def ratio_row(runs: dict[str, list[Run]], name: str, over: str, key: str) -> str:
    a, b = runs[name], runs[over]
    ratios = [x[key] / y[key] for x, y in zip(a, b)]
    return f"{median(a, key) / median(b, key):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"


def report_choices(runs: dict[str, list[Run]], seen: dict[str, list[str]], n: int) -> None:
    labels_ok = sum(t in LABELS for t in seen["choices"])
    free_ok = sum(t.strip() in LABELS for t in seen["2 tokens"])
    server_ok = sum(t.strip() in LABELS for t in seen["server grammar"])
    print()
    print(f"valid labels: choices {labels_ok}/{n}, 2 tokens free {free_ok}/{n}, server grammar {server_ok}/{n}; "
          f"positive among choices: {seen['choices'].count('positive')}")
    print("| choices, parallel 8 | prompts/s (median) | per round | choices / this (range) |")
    print("|---|---:|---|---|")
    for name in ("choices", "2 tokens", "server grammar"):
        print(f"| {name} | {median(runs[name], 'pps'):.1f} | {each(runs[name], 'pps')} | "
              f"{ratio_row(runs, 'choices', name, 'pps') if name != 'choices' else ''} |")


def report_json(runs: dict[str, list[Run]], seen: dict[str, list[str]], n: int, same_length: int) -> None:
    json_ok = sum(valid_json(t) for t in seen["json"])
    server_json_ok = sum(valid_json(t) for t in seen["server json_schema"])
    print()
    print(f"valid JSON: engine {json_ok}/{n}, server json_schema {server_json_ok}/{n}")
    print(f"JSON: the unconstrained baseline generates {same_length} tokens per prompt (the constrained mean)")
    print("| JSON, parallel 8 | tok/s (median) | per round | json / this (range) |")
    print("|---|---:|---|---|")
    for name in ("json", "json free", "server json_schema"):
        print(f"| {name} | {median(runs[name]):.1f} | {each(runs[name])} | "
              f"{ratio_row(runs, 'json', name, 'tps') if name != 'json' else ''} |")


if __name__ == "__main__":
    sys.exit(main())
