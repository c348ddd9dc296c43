"""The prefix cache: slot choice and sources without a model, then reuse and sharing on the real one."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from nbollama import Engine
from nbollama._api.requests import Handle, SamplingParams
from nbollama._core._prefix import (
    REUSE_MIN_TOKENS,
    SHARE_MIN_TOKENS,
    choose_slot,
    common_prefix,
    find_source,
)
from nbollama._core._slots import Request, Slot

SYSTEM = (
    "You are a patient tutor for a first course in chemistry. Answer in two short sentences, "
    "with concrete numbers and units where they help, and correct misconceptions kindly. "
) * 4


def tokens(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def request(toks: np.ndarray) -> Request:
    return Request(
        handle=Handle(1, "p", len(toks), 8, lambda h: None),
        tokens=toks,
        params=SamplingParams(max_tokens=8),
        priority=0,
        preview="p",
    )


def idle_with_cache(slot_id: int, cache: np.ndarray, last_used: float) -> Slot:
    slot = Slot(slot_id)
    slot.cache, slot.n_past, slot.last_used = cache, len(cache), last_used
    return slot


# -- without a model -----------------------------------------------------------------


def test_common_prefix() -> None:
    assert common_prefix(tokens(1, 2, 3), tokens(1, 2, 4)) == 2
    assert common_prefix(tokens(1, 2), tokens(1, 2, 3)) == 2
    assert common_prefix(tokens(), tokens(1)) == 0
    assert common_prefix(tokens(5), tokens(6)) == 0


def test_the_slot_with_the_longest_shared_prefix_wins_and_one_token_is_left_to_evaluate() -> None:
    prompt = np.arange(100, dtype=np.int32)
    slots = [
        idle_with_cache(0, np.arange(30, dtype=np.int32), last_used=1.0),
        idle_with_cache(
            1, np.arange(120, dtype=np.int32), last_used=5.0
        ),  # holds the whole prompt and more
        idle_with_cache(2, tokens(9, 9, 9), last_used=0.5),
    ]
    slot, keep = choose_slot(request(prompt), slots, reuse=True)
    assert slot.id == 1 and keep == 99  # never the whole prompt: its last token gives the logits


def test_without_a_useful_cache_the_least_recently_used_slot_is_taken() -> None:
    prompt = np.arange(1000, 1050, dtype=np.int32)
    short = np.arange(1000, 1000 + REUSE_MIN_TOKENS - 1, dtype=np.int32)  # too little to bother
    slots = [
        idle_with_cache(0, short, 9.0),
        idle_with_cache(1, tokens(1), 2.0),
        idle_with_cache(2, tokens(2), 3.0),
    ]
    slot, keep = choose_slot(request(prompt), slots, reuse=True)
    assert (slot.id, keep) == (1, 0)
    assert choose_slot(request(prompt), slots, reuse=False) == (slots[0], 0)


def test_a_long_prefix_held_by_another_slot_is_a_source() -> None:
    system = np.arange(200, dtype=np.int32)
    target = Slot(3)
    busy = Slot(0)
    busy.take(request(np.concatenate([system, tokens(7, 7)])), order=0, keep=0)  # still prefilling
    idle = idle_with_cache(1, np.concatenate([system[:150], tokens(5)]), 1.0)
    mine = request(np.concatenate([system, tokens(8, 8, 8)]))
    source = find_source(mine, target, [busy, idle, target], own=0)
    assert source is not None and (source.slot, source.tokens, source.ready) == (0, 200, False)
    busy.n_past = 200
    assert find_source(mine, target, [busy, idle, target], own=0).ready  # type: ignore[union-attr]
    # nothing worth a copy when the target's own cache already gives almost as much
    assert find_source(mine, target, [busy, idle, target], own=200 - SHARE_MIN_TOKENS + 1) is None


# -- on the real model ---------------------------------------------------------------------


def kv_cells(engine: Engine, slot: int) -> int:
    """What llama.cpp itself says the slot's sequence holds."""
    return engine._runner.context.sequence_length(slot)


def test_a_repeated_prompt_reuses_all_but_its_last_token(model_path: Path) -> None:
    prompt = SYSTEM + "Question: what is an atom?\nAnswer:"
    with Engine.load(model_path, parallel=1, ctx=512) as engine:
        first = engine.generate([prompt], max_tokens=8, temperature=0.0)[0]
        again = engine.generate([prompt], max_tokens=8, temperature=0.0)[0]
        assert first.cached_tokens == 0 and first.ok
        assert again.cached_tokens == again.prompt_tokens - 1
        snap = engine.snapshot()
        assert snap["totals"]["cached_tokens"] == again.cached_tokens
        assert 0.4 < snap["prefix_cache"]["hit_rate"] < 0.5  # one prompt of two came from the cache
        held = snap["slots"][0]["kv_used"]
        assert held == kv_cells(engine, 0) == again.prompt_tokens + again.completion_tokens - 1


def test_concurrent_prompts_share_one_prefill_of_their_common_prefix(model_path: Path) -> None:
    questions = ["what is an atom?", "why is water wet?", "what is a mole?", "how do acids work?"]
    prompts = [f"{SYSTEM}Question: {q}\nAnswer:" for q in questions]
    with Engine.load(model_path, parallel=4, ctx=512) as engine:
        system_len = len(engine.tokenize(SYSTEM))
        results = engine.generate(prompts, max_tokens=8, temperature=0.0)
        assert all(r.ok for r in results)
        assert results[0].cached_tokens == 0  # the one that prefilled it
        assert all(r.cached_tokens >= system_len for r in results[1:])
        assert engine.snapshot()["prefix_cache"]["shared_prefills"] == 3
        for slot in range(4):  # the bookkeeping matches what llama.cpp holds
            assert engine.snapshot()["slots"][slot]["kv_used"] == kv_cells(engine, slot)


def test_without_reuse_the_cache_changes_nothing(model_path: Path) -> None:
    """Prompts that share no long prefix are prefilled exactly as with the cache off."""
    prompts = [f"Tell me about {x}. " * 6 for x in ("iron", "neon", "gold", "zinc", "lead", "tin")]
    with Engine.load(model_path, parallel=4, ctx=512, prefix_cache=False) as off:
        expected = [r.text for r in off.generate(prompts, max_tokens=24, temperature=0.0)]
    with Engine.load(model_path, parallel=4, ctx=512) as on:
        results = on.generate(prompts, max_tokens=24, temperature=0.0)
    assert [r.text for r in results] == expected
    assert all(r.cached_tokens == 0 for r in results)


def test_no_prefix_cache_keeps_nothing(model_path: Path) -> None:
    prompt = SYSTEM + "Question: what is a bond?"
    with Engine.load(model_path, parallel=1, ctx=512, prefix_cache=False) as engine:
        engine.generate([prompt], max_tokens=4, temperature=0.0)
        again = engine.generate([prompt], max_tokens=4, temperature=0.0)[0]
        assert again.cached_tokens == 0
        assert kv_cells(engine, 0) == 0
        snap = engine.snapshot()
        assert snap["prefix_cache"] == {
            "enabled": False, "hit_rate": 0.0, "shared_prefills": 0, "ram_prompts": 0, "ram_bytes": 0
        }


def test_a_failed_request_leaves_no_cache_and_a_cancelled_one_a_true_one(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbollama._core import _loop as engine_module
    from nbollama._core._text import TextStream

    class Faulty(TextStream):
        def feed(self, piece: bytes) -> str:
            if "<<fail>>" in self.stops:
                raise RuntimeError("injected")
            return super().feed(piece)

    with Engine.load(model_path, parallel=1, ctx=512) as engine:
        monkeypatch.setattr(engine_module, "TextStream", Faulty)
        failed = engine.generate([SYSTEM], max_tokens=8, temperature=0.0, stop=["<<fail>>"])[0]
        assert failed.finish_reason == "error"
        assert kv_cells(engine, 0) == 0 and engine.snapshot()["slots"][0]["kv_used"] == 0
        monkeypatch.undo()
        handle = engine.submit(SYSTEM + "Write a long essay:", max_tokens=300, temperature=0.0)
        while handle.completion_tokens < 5:
            time.sleep(0.01)
        handle.cancel()
        cancelled = handle.result(timeout=30)
        assert cancelled.finish_reason == "cancelled"
        time.sleep(0.05)
        held = engine.snapshot()["slots"][0]["kv_used"]
        assert held == kv_cells(engine, 0) >= cancelled.prompt_tokens
        reused = engine.generate([SYSTEM + "Write a long essay:"], max_tokens=4, temperature=0.0)[0]
        assert reused.cached_tokens == reused.prompt_tokens - 1 and reused.ok


def test_a_full_unified_kv_evicts_cached_prefixes_before_failing_a_request(
    model_path: Path,
) -> None:
    """Two slots in one 256-cell buffer: cached prefixes must make room for a new request."""
    with Engine.load(model_path, parallel=2, ctx=128, kv_unified=True) as engine:
        fill = [("Describe the colour blue. " * 16), ("Describe the colour red. " * 16)]
        first = engine.generate(fill, max_tokens=24, temperature=0.0)
        assert all(r.ok for r in first)
        cached = sum(s["kv_used"] for s in engine.snapshot()["slots"])
        assert cached > 190  # the idle slots keep most of the buffer
        other = engine.generate(
            ["Describe the colour green. " * 16] * 2, max_tokens=24, temperature=0.0
        )
        assert all(r.ok for r in other), [r.error for r in other]
