"""The prompt cache in host RAM: its books without a model, then save and restore on the real one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nbollama import Engine
from nbollama._core._prefix import REUSE_MIN_TOKENS
from nbollama._core._prompt_cache import RESTORE_MIN_GAIN, PromptCache
from nbollama.exceptions import ContextError, InvalidParamsError
from nbollama.magics import StatusReport
from nbollama.widgets import dashboard

MIB = 1 << 20


def run(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


# -- without a model -----------------------------------------------------------------


def test_the_entry_sharing_most_wins_only_when_it_beats_the_slots_own_cache() -> None:
    cache = PromptCache(1)
    cache.add(run(0, 40), b"a" * 100)
    cache.add(np.concatenate([run(0, 20), run(500, 30)]), b"b" * 100)
    prompt = np.concatenate([run(0, 60), run(900, 5)])
    found = cache.best(prompt, len(prompt), beyond=0)
    assert found is not None and found[1] == 40 and found[0].state == b"a" * 100
    # the slot's own cache already gives 37: 3 more is not worth a restore, 4 are
    assert cache.best(prompt, len(prompt), beyond=40 - RESTORE_MIN_GAIN + 1) is None
    assert cache.best(prompt, len(prompt), beyond=40 - RESTORE_MIN_GAIN) is not None
    # never the whole prompt (its last token gives the logits), and whole chunks when aligned
    assert cache.best(run(0, 40), 40, beyond=0)[1] == 39  # type: ignore[index]
    assert cache.best(prompt, len(prompt), beyond=0, align=32)[1] == 32  # type: ignore[index]


def test_a_longer_sequence_replaces_the_ones_it_extends_and_the_oldest_go_first() -> None:
    cache = PromptCache(1)
    cache.add(run(0, 20), b"x" * 1000)
    assert not cache.worth_saving(run(0, 20))  # held already
    assert not cache.worth_saving(run(0, REUSE_MIN_TOKENS - 1) + 1000)  # too short to reuse
    cache.add(run(0, 50), b"y" * 1000)
    assert len(cache) == 1 and cache.saved == 2  # the 50 tokens hold the 20
    quarter = b"z" * (MIB // 4)
    for i in range(5):
        cache.add(run(10_000 * (i + 1), 30), quarter)
    assert cache.nbytes <= MIB and len(cache) == 3  # the budget: the oldest went
    assert cache.best(run(0, 60), 60, beyond=0) is None
    assert cache.best(run(50_000, 40), 40, beyond=0) is not None
    cache.add(run(0, 30), b"w" * (2 * MIB))  # larger than the whole budget: not kept
    assert len(cache) == 3 and not PromptCache(0).worth_saving(run(0, 40))


def test_cache_ram_is_checked_before_the_model_loads() -> None:
    with pytest.raises(InvalidParamsError, match=r"cache_ram=-1: MiB of host RAM"):
        Engine.load("/no/such/model.gguf", cache_ram=-1)
    with pytest.raises(InvalidParamsError, match=r"cache_ram=1\.5"):
        Engine.load("/no/such/model.gguf", cache_ram=1.5)  # type: ignore[arg-type]


# -- on the real model ---------------------------------------------------------------------

LESSON = (
    "Lesson notes for a first course in geography. Each answer names one city, spelled the usual "
    "English way, and nothing else. "
) * 3


def prompts_for(*topics: str) -> list[str]:
    return [f"{LESSON}Question: {t}\nAnswer:" for t in topics]


def test_a_prompt_whose_slot_moved_on_comes_back_from_ram(model_path: Path) -> None:
    first, third = prompts_for("the capital of France?", "a port in Chile?")
    with Engine.load(model_path, parallel=1, ctx=512) as engine:
        engine.generate([first], max_tokens=6, temperature=0.0)
        # the slot's own cache: all but the last prompt token kept, that one evaluated alone
        before = engine.generate([first], max_tokens=6, temperature=0.0, logprobs=1, cache=False)[0]
        assert before.cached_tokens == before.prompt_tokens - 1
        # an unrelated prompt takes the only slot: the first one's KV is saved before it is cut
        engine.generate(["Write a haiku about rain on a tin roof in autumn, please. " * 3],
                        max_tokens=4, temperature=0.0)
        assert engine.snapshot()["prefix_cache"]["ram_prompts"] == 1
        again = engine.generate([first], max_tokens=6, temperature=0.0, logprobs=1, cache=False)[0]
        assert again.cached_tokens == again.prompt_tokens - 1  # restored, not prefilled
        # the same bytes under the same last token: the same numbers, not merely close ones
        assert again.text == before.text and again.logprobs == before.logprobs
        # a prompt sharing only the lesson: restored up to where they part, the rest prefilled
        lesson_len = len(engine.tokenize(LESSON))
        shared = engine.generate([third], max_tokens=2, temperature=0.0, cache=False)[0]
        assert lesson_len <= shared.cached_tokens < shared.prompt_tokens - 1
        snap = engine.snapshot()
        assert snap["prefix_cache"]["ram_bytes"] > 0
        kept = snap["prefix_cache"]["ram_prompts"]
        assert f"{kept} prompts kept in RAM (" in repr(StatusReport(snap))
        board = dashboard(engine)  # the inline dashboard's header says it too
        try:
            board._on_snapshot(snap)
            assert f"{kept} prompts in RAM" in board._header.value
        finally:
            board.close()
        assert engine._runner.context.sequence_length(0) == snap["slots"][0]["kv_used"]


def test_restored_prompts_keep_reproducible_modes_promise(model_path: Path) -> None:
    """Reproducible mode keeps whole 128-token chunks; the restored bytes are the ones a prefill of
    those chunks wrote, so the text and logprobs are the same as with no prompt cache at all."""
    long_lesson = LESSON * 3  # past one 128-token chunk
    prompts = [f"{long_lesson}Question: {t}\nAnswer:" for t in ("the capital of Peru?", "the capital of Kenya?")]
    filler = "Count slowly from one to twenty in words, one per line. " * 12

    def texts(cache_ram: int) -> tuple[list[str], list[list[float]], int]:
        with Engine.load(model_path, parallel=1, ctx=512, reproducible=True, cache_ram=cache_ram) as engine:
            out = []
            for prompt in [prompts[0], filler, prompts[1], filler, prompts[0]]:
                out.append(engine.generate([prompt], max_tokens=8, temperature=0.0, logprobs=1, cache=False)[0])
            cached = out[-1].cached_tokens
        kept = [r for i, r in enumerate(out) if i % 2 == 0]
        return [r.text for r in kept], [[t["logprob"] for t in r.logprobs or []] for r in kept], cached

    with_ram, logprobs_with, cached = texts(1024)
    without, logprobs_without, cached_without = texts(0)
    assert cached >= 128 and cached % 128 == 0 and cached_without == 0
    assert with_ram == without and logprobs_with == logprobs_without


def test_closing_the_engine_frees_the_saved_prompts(model_path: Path) -> None:
    engine = Engine.load(model_path, parallel=1, ctx=512)
    for prompt in prompts_for("the capital of Chad?", "the capital of Laos?"):
        engine.generate([prompt], max_tokens=2, temperature=0.0, cache=False)
    saved = engine._scheduler.saved
    assert len(saved) == 1
    engine.close()
    assert len(saved) == 0 and saved.nbytes == 0


def test_a_prompt_that_cannot_be_saved_costs_only_its_entry(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Engine.load(model_path, parallel=1, ctx=512) as engine:

        def refuse(seq: int) -> bytearray:
            raise ContextError(f"llama.cpp could not save sequence {seq}")

        monkeypatch.setattr(engine._runner, "save_sequence", refuse)
        results = [
            engine.generate([p], max_tokens=2, temperature=0.0, cache=False)[0]
            for p in prompts_for("the capital of Chad?", "the capital of Laos?")
        ]
        assert all(r.ok for r in results) and engine.snapshot()["prefix_cache"]["ram_prompts"] == 0


def test_a_refused_state_is_prefilled_instead(model_path: Path) -> None:
    with Engine.load(model_path, parallel=1, ctx=512) as engine:
        context = engine._runner.context
        assert context.restore_sequence(0, b"not llama.cpp's bytes") is False
        assert context.sequence_length(0) == 0
        result = engine.generate(prompts_for("the capital of Spain?"), max_tokens=4, temperature=0.0, cache=False)[0]
        assert result.ok and result.cached_tokens == 0
