"""Reproducible mode on the real model: a request's token ids do not depend on what else runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nbollama import Engine, InvalidParamsError

PROMPTS_FILE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts.jsonl"
PROMPTS = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines()[:16]]
NEEDLE = "Explain why the sky is blue, in the voice of a pirate."
SAMPLING = [
    pytest.param({"temperature": 0.0}, id="greedy"),
    pytest.param({"temperature": 0.8, "seed": 1234}, id="seeded-0.8"),
]


# Every call here says cache=False: these tests measure the engine's numbers, and the result store
# would replay the first run's tokens into the second (the same key: parallel does not change them).


def ids(results: list) -> list[tuple[int, ...]]:
    return [r.token_ids for r in results]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_a_needle_decodes_the_same_alone_in_a_batch_and_in_another_slot(
    model_path: Path, sampling: dict
) -> None:
    with Engine.load(model_path, parallel=1, ctx=256, reproducible=True) as alone:
        expected = alone.generate([NEEDLE], max_tokens=40, cache=False, **sampling)[0]
    assert len(expected.token_ids) >= 20
    with Engine.load(model_path, parallel=8, ctx=256, reproducible=True) as eight:
        crowd = PROMPTS[:7]
        first = eight.generate([NEEDLE, *crowd], max_tokens=40, cache=False, **sampling)  # slot 0
        later = eight.generate(
            [*crowd, NEEDLE], max_tokens=40, cache=False, **sampling
        )  # slot 7 (the prefix cache moves it)
    assert first[0].token_ids == expected.token_ids
    assert later[-1].token_ids == expected.token_ids
    assert later[-1].slot != first[0].slot


def test_sixteen_prompts_give_the_same_tokens_at_parallel_1_4_and_8(model_path: Path) -> None:
    runs = {}
    for parallel in (1, 4, 8):
        with Engine.load(model_path, parallel=parallel, ctx=256, reproducible=True) as engine:
            runs[parallel] = ids(engine.generate(PROMPTS, max_tokens=16, cache=False, temperature=0.0))
    assert runs[1] == runs[4] == runs[8]


def test_late_arrivals_decode_as_if_alone(model_path: Path) -> None:
    with Engine.load(model_path, parallel=4, ctx=256, reproducible=True) as engine:
        expected = ids(engine.generate(PROMPTS[:6], max_tokens=24, cache=False, temperature=0.0))
        handles = []
        for prompt in PROMPTS[:6]:  # one by one, while the earlier ones generate
            handles.append(engine.submit(prompt, max_tokens=24, cache=False, temperature=0.0))
            time.sleep(0.15)
        assert [h.result().token_ids for h in handles] == expected


def test_the_prefix_cache_changes_nothing_in_reproducible_mode(model_path: Path) -> None:
    system = (
        "You are a careful assistant for a chemistry class. Answer briefly and precisely. " * 12
    )
    prompts = [
        f"{system}Question: {q}\nAnswer:"
        for q in ("What is pH?", "What is a mole?", "Why does ice float?")
    ]
    with Engine.load(model_path, parallel=2, ctx=512, reproducible=True, prefix_cache=False) as off:
        expected = ids(off.generate(prompts, max_tokens=16, cache=False, temperature=0.0))
    with Engine.load(model_path, parallel=2, ctx=512, reproducible=True) as on:
        first = on.generate(prompts, max_tokens=16, cache=False, temperature=0.0)
        again = on.generate(prompts, max_tokens=16, cache=False, temperature=0.0)
    assert ids(first) == expected and ids(again) == expected
    assert sum(r.cached_tokens for r in first + again) > 0
    assert all(
        r.cached_tokens % 128 == 0 for r in first + again
    )  # only whole prompt chunks are reused


def test_reproducible_mode_is_visible_and_refuses_a_unified_kv(model_path: Path) -> None:
    with pytest.raises(InvalidParamsError, match="kv_unified"):
        Engine.load(model_path, parallel=2, reproducible=True, kv_unified=True)
    with Engine.load(model_path, parallel=2, ctx=128, reproducible=True) as engine:
        assert engine.reproducible and "reproducible" in engine.summary
        snap = engine.snapshot()
        assert snap["reproducible"] is True and snap["parallel"] == 2
        assert "spare" in snap["memory"]["kv_estimate"]  # decodes are padded with spare sequences
