"""The result store through the engines: what is replayed under each policy, what changes a key, and
how an interrupted call resumes (in the kernel, and on a real llama-server)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbollama
from nbollama import Engine, store
from nbollama._api.feed import Feeder
from nbollama.llama_server import LlamaServer, find_binary

PROMPTS = [
    "The capital of France is",
    "Water boils at",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colours are",
    "A haiku about the sea:",
]


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    """A store of this test's own; the session's again afterwards."""
    store.use_directory(tmp_path / "store")
    yield tmp_path / "store"
    store.use_directory(None)


@pytest.fixture(scope="module")
def repro(model_path: Path) -> Iterator[Engine]:
    with Engine.load(model_path, parallel=4, ctx=256, reproducible=True) as engine:
        yield engine


def _cached(results: list[nbollama.Result]) -> list[bool]:
    return [r.cached for r in results]


def test_reproducible_greedy_requests_replay_and_never_reach_the_engine(repro: Engine, store_dir: Path) -> None:
    first = repro.generate(PROMPTS, max_tokens=8, temperature=0.0)
    submitted = repro.snapshot()["totals"]["submitted"]
    again = repro.generate(PROMPTS, max_tokens=8, temperature=0.0)
    assert _cached(first) == [False] * 6 and _cached(again) == [True] * 6
    assert [r.text for r in again] == [r.text for r in first]
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    assert repro.snapshot()["totals"]["submitted"] == submitted  # the engine's books: nothing reached it
    assert [r.prompt for r in again] == PROMPTS and all(r.slot is None for r in again)
    figures = store.stats()
    assert figures.entries == 6 and figures.hits >= 6 and figures.path is not None
    assert str(store_dir) in str(figures.path)


def test_auto_replays_no_sampled_request_and_true_replays_it(repro: Engine, store_dir: Path) -> None:
    sampled = repro.generate(PROMPTS[:3], max_tokens=8, temperature=0.9)
    assert _cached(repro.generate(PROMPTS[:3], max_tokens=8, temperature=0.9)) == [False] * 3
    like_dspy = repro.generate(PROMPTS[:3], max_tokens=8, temperature=0.9, cache=True)
    assert _cached(like_dspy) == [True] * 3 and len({r.text for r in like_dspy}) >= 1
    seeded = repro.generate(PROMPTS[:3], max_tokens=8, temperature=0.9, seed=3)
    assert _cached(repro.generate(PROMPTS[:3], max_tokens=8, temperature=0.9, seed=3)) == [True] * 3
    assert sampled and seeded


def test_cache_false_neither_reads_nor_writes(repro: Engine, store_dir: Path) -> None:
    repro.generate(PROMPTS[:2], max_tokens=6, temperature=0.0, cache=False)
    assert store.stats().entries == 0
    repro.generate(PROMPTS[:2], max_tokens=6, temperature=0.0)
    assert _cached(repro.generate(PROMPTS[:2], max_tokens=6, temperature=0.0, cache=False)) == [False] * 2
    with pytest.raises(nbollama.InvalidParamsError, match="cache='yes': must be 'auto', True or False"):
        repro.generate(PROMPTS[:1], cache="yes")


def test_a_normal_engine_replays_nothing_under_auto(engine: Engine, store_dir: Path) -> None:
    """Outside reproducible mode a rerun may decode differently in another batch: it runs again."""
    engine.generate(PROMPTS[:2], max_tokens=6, temperature=0.0)
    assert _cached(engine.generate(PROMPTS[:2], max_tokens=6, temperature=0.0)) == [False, False]
    assert _cached(engine.generate(PROMPTS[:2], max_tokens=6, temperature=0.0, cache=True)) == [True, True]


def test_what_decides_the_output_is_in_the_key(repro: Engine, store_dir: Path, model_path: Path) -> None:
    base = {"max_tokens": 6, "temperature": 0.0}
    prompt = ["Name a colour:"]
    repro.generate(prompt, **base)
    assert repro.generate(prompt, **base)[0].cached
    for changed in ({"stop": ["."]}, {"seed": 5, "temperature": 0.5}, {"max_tokens": 7}, {"chat": True},
                    {"chat": True, "system": "Answer in French."}, {"logprobs": 2}):
        first = repro.generate(prompt, **{**base, **changed})[0]
        assert not first.cached, changed  # another template, stop string, seed, length: a miss
        assert repro.generate(prompt, **{**base, **changed})[0].cached, changed
    with repro.spawn(parallel=2, kv_type="q8_0") as quantised:  # another KV type: a miss
        assert not quantised.generate(prompt, **base)[0].cached


def test_a_gguf_replaced_at_the_same_path_is_a_miss(store_dir: Path, model_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model.gguf"
    shutil.copyfile(model_path, copy)
    prompt = ["The opposite of hot is"]
    with Engine.load(copy, parallel=1, ctx=128, reproducible=True) as engine:
        engine.generate(prompt, max_tokens=4, temperature=0.0)
        assert engine.generate(prompt, max_tokens=4, temperature=0.0)[0].cached
    data = bytearray(copy.read_bytes())
    where = data.find(b"Gemma 3 270m", 0, 1 << 20)
    assert where > 0
    data[where : where + 12] = b"Gemma 3 270M"  # new weights would do the same: other bytes, one path
    copy.write_bytes(bytes(data))
    with Engine.load(copy, parallel=1, ctx=128, reproducible=True) as engine:
        assert engine.model_name == "Gemma 3 270M"
        assert not engine.generate(prompt, max_tokens=4, temperature=0.0)[0].cached


def _interrupted(engine: nbollama.engine.EngineLike, prompts: list[str], params: dict[str, object], rows: int) -> int:
    """Feed a call as ``generate`` does, stop it once ``rows`` finished (a dead kernel would stop it
    anywhere); how many finished."""
    feeder = Feeder(prompts, engine.submit_many, params, window=4, run=engine.open_store_run(prompts, dict(params)))
    feeder.feed()
    while feeder.done < rows:
        feeder.poll(0.05)
    feeder.cancel()
    finished = sum(1 for r in feeder.results() if r.ok)
    store.current().flush()
    return finished


def test_an_interrupted_call_resumes_with_its_finished_rows_sampled_ones_too(engine: Engine, store_dir: Path) -> None:
    prompts = [f"Write one sentence about the number {i}." for i in range(12)]
    params = {"max_tokens": 12, "temperature": 0.9}  # sampled: replayed only to resume
    finished = _interrupted(engine, prompts, params, rows=4)
    assert 4 <= finished < 12
    before = engine.snapshot()["totals"]["submitted"]
    resumed = engine.generate(prompts, **params)
    assert sum(_cached(resumed)) == finished  # the finished rows came back, the rest ran
    assert engine.snapshot()["totals"]["submitted"] - before == 12 - finished
    assert [r.prompt for r in resumed] == prompts and all(r.ok for r in resumed)
    assert _cached(engine.generate(prompts, **params)) == [False] * 12  # that run completed: a new one


def test_a_store_that_cannot_be_used_says_so_once_and_generation_goes_on(
    repro: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store.use_directory(blocker / "store")
    try:
        with caplog.at_level(logging.WARNING, logger="nbollama"):
            first = repro.generate(PROMPTS[:2], max_tokens=4, temperature=0.0)
            second = repro.generate(PROMPTS[:2], max_tokens=4, temperature=0.0)
    finally:
        store.use_directory(None)
    assert all(r.ok for r in first + second) and not any(_cached(second))
    said = [r.getMessage() for r in caplog.records if "result store off" in r.getMessage()]
    assert len(said) == 1 and str(blocker) in said[0]


def test_a_remote_call_resumes_on_a_real_llama_server(model_path: Path, store_dir: Path) -> None:
    binary = find_binary()
    if binary is None:
        pytest.fail("llama-server is not built: scripts/setup.sh --test builds it")
    prompts = [f"Name a fruit that starts with the letter {c}:" for c in "ABCDEFGH"]
    params = {"max_tokens": 8, "temperature": 0.7}
    with LlamaServer(model_path, ["-np", "2", "-c", "1024"], binary=binary) as server:
        remote = nbollama.remote.connect(server.url)
        try:
            finished = _interrupted(remote, prompts, params, rows=3)
            resumed = remote.generate(prompts, **params)
        finally:
            remote.close()
    assert 3 <= finished < 8 and sum(_cached(resumed)) == finished
    assert [r.prompt for r in resumed] == prompts and all(r.ok for r in resumed)


# -- in the magics: --cache / --no-cache, the progress line, the cards, %nbollama cache ------------


def test_the_cache_options_are_checked_before_anything_runs() -> None:
    from IPython.core.error import UsageError

    from nbollama.magics._parse_generate import GenerateCall, parse_generate
    from nbollama.magics._parse_nbollama import CacheCall, parse_nbollama

    call = parse_generate("--cache", "hi", {})
    assert isinstance(call, GenerateCall) and call.params["cache"] is True
    assert parse_generate("--no-cache", "hi", {}).params["cache"] is False  # type: ignore[union-attr]
    assert "cache" not in parse_generate("", "hi", {}).params  # type: ignore[union-attr]
    with pytest.raises(UsageError, match="not allowed with argument"):
        parse_generate("--cache --no-cache", "hi", {})
    assert parse_nbollama("cache clear --model gemma --older-than 7d") == CacheCall(True, "gemma", 7 * 86400.0, None)
    assert parse_nbollama("cache --dir /tmp/x") == CacheCall(False, None, None, "/tmp/x")
    with pytest.raises(UsageError, match="--model and --older-than choose what `cache clear` removes"):
        parse_nbollama("cache --model gemma")
    with pytest.raises(UsageError, match="is not an age"):
        parse_nbollama("cache clear --older-than soon")


def test_a_cell_run_again_says_what_came_from_the_store(
    shell: Any, repro: Engine, store_dir: Path, shown: list[dict[str, Any]]
) -> None:
    from nbollama import session

    session.set_engine(repro, close_previous=False)
    try:
        cell = "\n".join(f"Line {i}: the sea is" for i in range(20))
        first = shell.run_cell_magic("generate", "--lines --max-tokens 2 --temperature 0", cell)
        shown.clear()
        again = shell.run_cell_magic("generate", "--lines --max-tokens 2 --temperature 0", cell)
        assert [r.text for r in again] == [r.text for r in first] and all(r.cached for r in again)
        final = shown[-1]["data"]
        assert "20 cached" in final["text/plain"] and "20 cached" in final["text/html"]
        shown.clear()
        few = shell.run_cell_magic("generate", "--max-tokens 2 --temperature 0", "Line 0: the sea is")
        assert few[0].cached
        card = shown[-1]["data"]["text/html"]
        assert ">cached<" in card and "replayed from the result store" in card
        report = shell.run_line_magic("nbollama", "cache")
        assert report.stats.entries == 20 and "this kernel" in repr(report)
        assert "nbollama-cache" in report._repr_html_()
        cleared = shell.run_line_magic("nbollama", "cache clear")
        assert "removed 20 entries" in repr(cleared) and cleared.stats.entries == 0
    finally:
        session.set_engine(None, close_previous=False)
