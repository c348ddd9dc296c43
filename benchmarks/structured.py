"""Structured outputs against free generation and against llama-server's grammar sampler.

* **Choices**: 400 short reviews, "positive" or "negative", parallel 8. The
  engine's ``choices=`` (scored from the prefill) against 2 greedy tokens
  unconstrained, and against ``llama-server -np 8`` with a grammar that allows
  only the two labels.
* **JSON**, parallel 8, on three schemas: ``review`` (an enum, a number and a
  string array of up to 3 items), ``tags`` (a bare string array: few tokens
  forced) and ``profile`` (an object of 8 keys with enums: most tokens
  forced). For each, the engine constrained with jump-forward (forced tokens
  decoded as one chunk, not sampled) and without it (``--jump-forward off``),
  unconstrained generation of the same mean length (every answer at the
  mean, and "matched": each answer at its JSON answer's length, so the
  answers end apart as the JSON ones do), and llama-server with
  ``json_schema``. A constrained answer ends when its JSON does, so the
  unconstrained baseline generates as many tokens per prompt as the
  constrained answers' mean, measured in the warm-up; otherwise tok/s would
  compare prefill shares, not the cost of the format. Every output is parsed
  and validated against its schema (``jsonschema``). For the engine's runs the
  table also gives where a step's time went: the decode, llguidance on the
  engine's thread, masks filled during the decode (overlapped), waiting for
  them, applying masks, and sampling.

Each system runs in its own process; rounds alternate the order; the tables
give medians and ratios with their range over rounds.

    python -m nbollama.llama_server build     # once
    python benchmarks/structured.py           # 3 rounds
    python benchmarks/structured.py --only json --schemas tags --jump-forward off
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from typing import Any

import jsonschema
from _harness import Run, Worker, each, interleave, machine_line, median, server_run

from nbollama.llama_server import LlamaServer, find_binary
from nbollama.sources import resolve_model

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
TAGS = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 4}
_FORM = {
    "sentiment": ["positive", "negative", "mixed"],
    "topic": THINGS,
    "recommend": ["yes", "no", "maybe"],
    "tone": ["enthusiastic", "calm", "angry", "sarcastic"],
    "length": ["short", "medium", "long"],
    "audience": ["general", "experts", "families"],
    "language": ["english", "other"],
    "confidence": ["low", "medium", "high"],
}
PROFILE = {
    "type": "object",
    "properties": {key: {"enum": values} for key, values in _FORM.items()},
    "required": list(_FORM),
    "additionalProperties": False,
}
#: name -> (schema, what the prompt asks, max_tokens)
SCHEMAS: dict[str, tuple[dict[str, Any], str, int]] = {
    "review": (SCHEMA, "As JSON:", 64),
    "tags": (TAGS, "Up to four words about it, as a JSON list:", 64),
    "profile": (PROFILE, "The review as a JSON form:", 96),
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


def valid_json(text: str, schema: dict[str, Any] = SCHEMA) -> bool:
    """Whether ``text`` parses and follows ``schema``."""
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=400)
    parser.add_argument("--json-prompts", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ctx", type=int, default=512, help="context per slot, for both")
    parser.add_argument("--only", choices=["choices", "json"], help="run one of the two parts")
    parser.add_argument("--schemas", default=",".join(SCHEMAS), help=f"JSON schemas to run, of {','.join(SCHEMAS)}")
    parser.add_argument("--jump-forward", choices=["on", "off", "both"], default="both",
                        help="the engine's constrained runs with jump-forward, without, or both (default)")
    args = parser.parse_args(argv)
    schemas = [name.strip() for name in args.schemas.split(",") if name.strip()]
    unknown = [name for name in schemas if name not in SCHEMAS]
    if unknown:
        parser.error(f"--schemas: unknown {unknown}; known: {list(SCHEMAS)}")
    binary = find_binary()
    if binary is None:
        raise SystemExit("llama-server is not built: run `python -m nbollama.llama_server build` first")
    prompts = reviews(args.reviews)
    n = args.parallel
    print(
        f"{machine_line()}; reviews={len(prompts)} json prompts={args.json_prompts} schemas={','.join(schemas)} "
        f"parallel={n} threads={args.threads} ctx/slot={args.ctx} rounds={args.rounds} jump-forward={args.jump_forward}",
        flush=True,
    )
    config = {"parallel": n, "ctx": args.ctx, "threads": args.threads, "prefix_cache": False}
    server = LlamaServer(
        resolve_model(None),
        ["-np", str(n), "-c", str(args.ctx * n), "-t", str(args.threads), "-tb", str(args.threads),
         "-b", "512", "-ub", "512"],
    ).start()
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.jump_forward]
    choices_w, free_w = Worker("engine", dict(config)), Worker("engine", dict(config))
    json_ws = {jf: Worker("engine", {**config, "jump_forward": jf}) for jf in modes}
    label_grammar = 'root ::= " positive" | " negative"'
    seen: dict[str, list[str]] = {}

    def engine(worker: Worker, job: dict[str, Any], name: str, count: int) -> Run:
        run = worker.run(job)
        seen[name] = run.pop("texts")  # type: ignore[arg-type]
        run.pop("lengths", None)
        return with_pps(run, count)

    def on_server(bodies: list[dict[str, Any]], name: str) -> Run:
        run, texts = server_run(server.url, bodies, n)
        seen[name] = texts
        return run

    lengths: dict[str, int] = {}
    try:
        server_run(server.url, [{"prompt": "Warm up.", "n_predict": 2}], 1)
        choices_w.run({"prompts": prompts[:8], "choices": LABELS})
        label_bodies = [
            {"prompt": p, "n_predict": 8, "temperature": 0.0, "cache_prompt": False, "grammar": label_grammar}
            for p in prompts
        ]
        setups: list[tuple[str, Any]] = [
            ("choices", lambda: engine(choices_w, {"prompts": prompts, "choices": LABELS}, "choices", len(prompts))),
            ("2 tokens", lambda: engine(free_w, {"prompts": prompts, "max_tokens": 2, "temperature": 0.0}, "2 tokens", len(prompts))),
            ("server grammar", lambda: on_server(label_bodies, "server grammar")),
        ]
        json_setups: list[tuple[str, Any]] = []
        if args.only != "choices":
            for name in schemas:
                json_setups += _json_setups(name, prompts[: args.json_prompts], json_ws, free_w, engine, on_server, lengths, n)
        runs = interleave(
            {"choices": setups, "json": json_setups}.get(args.only or "", setups + json_setups),
            args.rounds,
        )
    finally:
        for w in (choices_w, free_w, *json_ws.values()):
            w.close()
        server.stop()

    if args.only != "json":
        report_choices(runs, seen, len(prompts))
    if args.only != "choices":
        for name in schemas:
            report_json(name, runs, seen, lengths[name], modes)
    return 0


def _json_setups(
    name: str,
    reviews_: list[str],
    json_ws: dict[bool, Worker],
    free_w: Worker,
    engine: Any,
    on_server: Any,
    lengths: dict[str, int],
    n: int,
) -> list[tuple[str, Any]]:
    """One schema's setups: the engine with and/or without jump-forward, free text of the same
    mean length (measured now, in the warm-up), and llama-server's json_schema."""
    schema, ask, max_tokens = SCHEMAS[name]
    json_prompts = [p.replace("Sentiment:", ask) for p in reviews_]
    job = {"prompts": json_prompts, "max_tokens": max_tokens, "temperature": 0.0, "json_schema": schema}
    warm = {jf: w.run(job) for jf, w in json_ws.items()}  # llguidance's tokenizer built
    first = next(iter(warm.values()))
    lengths[name] = same_length = max(1, round(first["tokens"] / len(json_prompts)))
    free_job = {"prompts": json_prompts, "max_tokens": same_length, "temperature": 0.0}
    free_w.run(free_job)
    # the same lengths, prompt by prompt: the answers end apart, as the JSON ones do
    matched_job = {"prompts": json_prompts, "max_tokens_each": first["lengths"], "temperature": 0.0}
    free_w.run(matched_job)
    bodies = [
        {"prompt": p, "n_predict": max_tokens, "temperature": 0.0, "cache_prompt": False, "json_schema": schema}
        for p in json_prompts
    ]
    count = len(json_prompts)
    out: list[tuple[str, Any]] = [
        (f"{name} {_label(jf)}", lambda jf=jf, w=w: engine(w, job, f"{name} {_label(jf)}", count))
        for jf, w in json_ws.items()
    ]
    out.append((f"{name} free", lambda: engine(free_w, free_job, f"{name} free", count)))
    out.append((f"{name} free matched", lambda: engine(free_w, matched_job, f"{name} free matched", count)))
    out.append((f"{name} server", lambda: on_server(bodies, f"{name} server")))
    return out


def _label(jump_forward: bool) -> str:
    return "json" if jump_forward else "json jf-off"


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


def report_json(name: str, runs: dict[str, list[Run]], seen: dict[str, list[str]], same_length: int, modes: list[bool]) -> None:
    schema = SCHEMAS[name][0]
    engines = [f"{name} {_label(jf)}" for jf in modes]
    rows = [*engines, f"{name} free", f"{name} free matched", f"{name} server"]
    n = len(seen[rows[0]])
    valid = ", ".join(f"{row.removeprefix(name + ' ')} {sum(valid_json(t, schema) for t in seen[row])}/{n}"
                      for row in rows if not row.startswith(f"{name} free"))
    print()
    print(f"{name}: valid JSON: {valid}; the unconstrained baseline generates {same_length} tokens per prompt "
          "(the constrained mean); 'free matched' generates each prompt's JSON answer's length")
    first = engines[0]
    print(f"| {name}, parallel 8 | tok/s (median) | per round | {first.removeprefix(name + ' ')} / this (range) |")
    print("|---|---:|---|---|")
    for row in rows:
        print(f"| {row} | {median(runs[row]):.1f} | {each(runs[row])} | "
              f"{ratio_row(runs, first, row, 'tps') if row != first else ''} |")
    print(f"| {name}: where a step's time goes (ms per step, median over rounds) | steps | forced tokens "
          "| decode | llguidance | masks ahead (overlapped) | mask wait | masking | sampling |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in engines:
        times = [r["step_times"] for r in runs[row] if "step_times" in r]  # type: ignore[misc]
        if not times:
            continue
        steps = statistics.median(t["steps"] for t in times)
        forced = statistics.median(r.get("forced_tokens", 0) / r["tokens"] for r in runs[row]) * 100
        per_step = [
            statistics.median(1000 * t[f"{part}_s"] / max(t["steps"], 1) for t in times)
            for part in ("decode", "guidance", "masks_ahead", "mask_wait", "masking", "sampling")
        ]
        print(f"| {row} | {steps:.0f} | {forced:.0f}% | " + " | ".join(f"{v:.2f}" for v in per_step) + " |")


if __name__ == "__main__":
    sys.exit(main())
