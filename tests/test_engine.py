"""The engine on the real bundled model: slots, batching, streaming, cancelling, queueing."""

from __future__ import annotations

import _thread
import ctypes
import gc
import json
import os
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import psutil
import pytest

from nbollama import (
    Engine,
    EngineClosedError,
    InvalidParamsError,
    PromptTooLongError,
    QueueFullError,
)

PROMPTS = (
    [
        json.loads(line)["prompt"]
        for line in (Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts.jsonl")
        .read_text()
        .splitlines()[:16]
    ]
    if (Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts.jsonl").exists()
    else [f"Question {i}: name one interesting fact about the number {i}." for i in range(16)]
)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def test_sixteen_prompts_at_parallel_four(idle_engine: Engine) -> None:
    results = idle_engine.generate(PROMPTS, max_tokens=12, temperature=0.0)
    assert [r.prompt for r in results] == PROMPTS  # input order
    assert all(r.finish_reason in ("stop", "length") for r in results)
    assert all(r.error is None for r in results)
    assert {r.slot for r in results} == {0, 1, 2, 3}  # every slot served
    assert all(0 < r.completion_tokens <= 12 for r in results if r.finish_reason == "length")
    assert all(r.ttft is not None and r.ttft >= r.queue_wait for r in results)
    # continuous batching: the later prompts waited in the queue, the first four did not
    assert max(r.queue_wait for r in results[:4]) < min(r.queue_wait for r in results[-4:])
    snap = idle_engine.snapshot()
    assert snap["busy_slots"] == 0 and snap["queue"]["length"] == 0


def test_streamed_deltas_join_to_the_final_text(idle_engine: Engine) -> None:
    handle = idle_engine.submit("Once upon a time", max_tokens=24, temperature=0.7, seed=3)
    deltas = list(handle)
    result = handle.result()
    assert len(deltas) >= 2, "text should arrive in pieces, not in one blob"
    assert "".join(deltas) == result.text
    assert list(handle) == [result.text] or "".join(handle) == result.text  # replay after the end


def test_multibyte_text_streams_without_broken_characters(idle_engine: Engine) -> None:
    handle = idle_engine.submit("日本の首都は東京です。東京は", max_tokens=24, temperature=0.0)
    text = "".join(handle)
    assert text == handle.result().text
    assert "\ufffd" not in text


def test_cancelling_a_running_request_frees_its_slot(idle_engine: Engine) -> None:
    long = idle_engine.submit(
        "Write a very long story about the sea.", max_tokens=400, temperature=0.0
    )
    others = [idle_engine.submit(p, max_tokens=16, temperature=0.0) for p in PROMPTS[:3]]
    wait_until(lambda: long.completion_tokens >= 3)
    slot = long.slot
    assert long.cancel() is True
    result = long.result(timeout=10)
    assert result.finish_reason == "cancelled"
    assert result.text and 3 <= result.completion_tokens < 400  # what was generated is kept
    # the freed slot takes new work while the others finish normally
    follow = idle_engine.submit("Name a colour.", max_tokens=8, temperature=0.0)
    assert all(h.result(timeout=60).ok for h in others)
    assert follow.result(timeout=60).ok
    snap = idle_engine.snapshot()
    assert snap["slots"][slot]["state"] == "idle"
    assert long.cancel() is False  # already finished


def test_cancelling_a_queued_request_finishes_it_at_once(engine: Engine) -> None:
    small = engine.spawn(parallel=1, ctx=256)
    try:
        blocker = small.submit("Count slowly:", max_tokens=200, temperature=0.0)
        queued = small.submit("Never started", max_tokens=8)
        assert queued.status == "queued"
        queued.cancel()
        result = queued.result(timeout=1)
        assert result.finish_reason == "cancelled" and result.completion_tokens == 0
        assert result.slot is None
        blocker.cancel()
        assert blocker.result(timeout=10).finish_reason == "cancelled"
    finally:
        small.close()


def test_queue_full_raises_and_leaves_the_engine_working(engine: Engine) -> None:
    small = engine.spawn(parallel=1, ctx=256, max_queue=2)
    try:
        running = small.submit("Tell me about rivers.", max_tokens=200, temperature=0.0)
        wait_until(lambda: running.status != "queued")
        waiting = [small.submit("a", max_tokens=4), small.submit("b", max_tokens=4)]
        with pytest.raises(QueueFullError, match="queue limit 2"):
            small.submit("c", max_tokens=4)
        # a batch that does not fit is refused whole: nothing of it is queued
        with pytest.raises(QueueFullError, match="2 more do not fit"):
            small.submit_many(["c", "d"], max_tokens=4)
        assert small.snapshot()["queue"]["length"] == 2
        running.cancel()
        assert all(h.result(timeout=30).finish_reason in ("stop", "length") for h in waiting)
        assert small.generate(["d"], max_tokens=4)[0].ok
    finally:
        small.close()


def test_higher_priority_is_served_first_fifo_within_a_priority(engine: Engine) -> None:
    small = engine.spawn(parallel=1, ctx=256)
    try:
        blocker = small.submit("Describe the ocean.", max_tokens=60, temperature=0.0)
        wait_until(lambda: blocker.status != "queued")
        order = [("low-1", 0), ("high-1", 5), ("low-2", 0), ("mid", 2), ("high-2", 5)]
        handles = {name: small.submit(name, max_tokens=2, priority=p) for name, p in order}
        for h in handles.values():
            h.result(timeout=60)
        started = sorted(handles, key=lambda n: handles[n].timing.started)
        assert started == ["high-1", "high-2", "mid", "low-1", "low-2"]
    finally:
        small.close()


def test_prompt_too_long_fails_that_request_alone(idle_engine: Engine) -> None:
    too_long = "word " * 700  # > 512 tokens of one slot
    results = idle_engine.generate(
        [PROMPTS[0], too_long, PROMPTS[1]], max_tokens=6, temperature=0.0
    )
    assert results[0].ok and results[2].ok
    bad = results[1]
    assert bad.finish_reason == "error"
    assert "one slot holds 512" in (bad.error or "")
    handle = idle_engine.submit(too_long, max_tokens=4)
    assert isinstance(handle.exception(), PromptTooLongError)


def test_generation_stops_at_the_slot_context(engine: Engine) -> None:
    small = engine.spawn(parallel=2, ctx=64)
    try:
        result = small.generate(["Tell a long story:"], max_tokens=1000, temperature=0.0)[0]
        assert result.finish_reason in ("length", "stop")
        assert result.prompt_tokens + result.completion_tokens <= 64 + 1
    finally:
        small.close()


def test_stop_strings_cut_the_text_and_never_leak_into_the_stream(idle_engine: Engine) -> None:
    prompt = "The capital of France is Paris. The capital of Italy is"
    free = idle_engine.generate([prompt], max_tokens=24, temperature=0.0)[0].text
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]
    cut = free[: free.index(stop)]
    handle = idle_engine.submit(prompt, max_tokens=24, temperature=0.0, stop=[stop])
    streamed = "".join(handle)
    result = handle.result()
    assert result.finish_reason == "stop"
    assert result.text == cut == streamed


def test_same_seed_same_text(idle_engine: Engine) -> None:
    kwargs = dict(max_tokens=20, temperature=0.9, seed=1234)
    first = idle_engine.generate(["Invent a name for a dragon:"], **kwargs)[0].text
    second = idle_engine.generate(["Invent a name for a dragon:"], **kwargs)[0].text
    other = {
        idle_engine.generate(["Invent a name for a dragon:"], **{**kwargs, "seed": s})[0].text
        for s in (1, 2, 3)
    }
    assert first == second
    assert len(other | {first}) > 1, "different seeds should be able to differ"


def test_a_batch_of_prompts_is_reproducible_at_the_same_parallel(idle_engine: Engine) -> None:
    """The prompts are queued together, so the batches, and llama.cpp's numerics, repeat."""
    first = [r.text for r in idle_engine.generate(PROMPTS[:10], max_tokens=24, temperature=0.0)]
    second = [r.text for r in idle_engine.generate(PROMPTS[:10], max_tokens=24, temperature=0.0)]
    assert first == second


def test_chat_template(idle_engine: Engine) -> None:
    raw = idle_engine.submit("Say hi.", max_tokens=4, temperature=0.0)
    chat = idle_engine.submit(
        "Say hi.", max_tokens=4, temperature=0.0, chat=True, system="Be brief."
    )
    assert chat.prompt_tokens > raw.prompt_tokens + 4  # turn markers and the system text
    assert chat.result(timeout=30).ok and raw.result(timeout=30).ok
    with pytest.raises(InvalidParamsError, match="chat=True"):
        idle_engine.submit("x", system="only with chat")


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"min_p": 1.5},
        {"top_k": -2},
        {"repeat_penalty": 0.0},
        {"stop": [""]},
        {"priority": "high"},
    ],
)
def test_bad_parameters_raise_clear_errors(idle_engine: Engine, bad: dict) -> None:
    with pytest.raises(InvalidParamsError, match=next(iter(bad))):
        idle_engine.submit("hello", **bad)


def test_a_misspelt_parameter_is_named(idle_engine: Engine) -> None:
    with pytest.raises(InvalidParamsError, match="unknown parameter.*temprature"):
        idle_engine.generate(["hello"], temprature=0.5)


def test_snapshot_is_plain_data_and_tracks_work(idle_engine: Engine) -> None:
    handles = [idle_engine.submit(p, max_tokens=40, temperature=0.0) for p in PROMPTS[:4]]
    wait_until(lambda: any(h.completion_tokens >= 2 for h in handles))
    snap = idle_engine.snapshot()
    json.dumps(snap)  # plain, JSON-ready
    assert snap["v"] == 1 and snap["parallel"] == 4 and snap["ctx_per_slot"] == 512
    assert len(snap["slots"]) == 4
    busy = [s for s in snap["slots"] if s["state"] != "idle"]
    assert busy and all(s["request_id"] is not None and s["prompt_preview"] for s in busy)
    assert snap["kv"]["used"] > 0 and snap["kv"]["total"] == 4 * 512 and snap["kv"]["bytes"] > 0
    assert snap["memory"]["process_rss"] > 0 and snap["memory"]["source"] in ("host", "nvml")
    for h in handles:
        h.result(timeout=60)
    after = idle_engine.snapshot()
    assert after["totals"]["generated_tokens"] >= snap["totals"]["generated_tokens"] + 4
    assert {r["id"] for r in after["recent"]} >= {h.id for h in handles}
    # finished slots keep their tokens' KV for the prefix cache, and nothing else
    assert after["kv"]["used"] == sum(s["kv_used"] for s in after["slots"]) > 0
    assert all(s["state"] == "idle" for s in after["slots"])


def test_subscribe_is_rate_limited_and_quiet_when_idle(idle_engine: Engine) -> None:
    calls: list[float] = []
    sub = idle_engine.subscribe(lambda snap: calls.append(time.monotonic()), interval=0.25)
    try:
        started = time.monotonic()
        idle_engine.generate(PROMPTS[:8], max_tokens=24, temperature=0.0)
        busy_time = time.monotonic() - started
        time.sleep(3.5)  # throughput decays to zero, then nothing changes
        settled = len(calls)
        time.sleep(1.0)
        assert len(calls) == settled, "no snapshots while nothing changes"
        assert len(calls) >= 2
        gaps = [b - a for a, b in zip(calls, calls[1:])]
        assert min(gaps) >= 0.2
        assert len(calls) <= (busy_time + 4.5) * 4 + 2
    finally:
        sub.close()


def test_keyboard_interrupt_cancels_the_call_and_keeps_the_engine(idle_engine: Engine) -> None:
    timer = threading.Timer(0.6, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        idle_engine.generate(
            ["Write a long essay about mountains."] * 6, max_tokens=400, temperature=0.0
        )
    wait_until(lambda: idle_engine.snapshot()["busy_slots"] == 0, timeout=10)
    assert idle_engine.snapshot()["queue"]["length"] == 0
    assert idle_engine.generate(["Name a fruit."], max_tokens=4)[0].ok


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_api(idle_engine: Engine, backend: str) -> None:
    async def main() -> None:
        results = await idle_engine.agenerate(PROMPTS[:5], max_tokens=8, temperature=0.0)
        assert [r.prompt for r in results] == PROMPTS[:5] and all(r.ok for r in results)
        handle = idle_engine.submit("The moon is", max_tokens=16, temperature=0.0)
        deltas = [d async for d in handle.astream()]
        result = await handle
        assert "".join(deltas) == result.text and len(deltas) >= 2
        # cancelling the awaiting task cancels the requests
        with anyio.move_on_after(0.5):
            await idle_engine.agenerate(["Write a long poem."] * 2, max_tokens=400)

    anyio.run(main, backend=backend)
    wait_until(lambda: idle_engine.snapshot()["busy_slots"] == 0, timeout=10)


def test_closed_engine_refuses_work_and_cancels_what_was_running(engine: Engine) -> None:
    small = engine.spawn(parallel=2, ctx=256)
    running = small.submit("A long tale:", max_tokens=400, temperature=0.0)
    queued = [small.submit("x", max_tokens=400) for _ in range(3)]
    wait_until(lambda: running.completion_tokens >= 2)
    small.close()
    assert running.result(timeout=1).finish_reason == "cancelled"
    assert all(h.result(timeout=1).finish_reason == "cancelled" for h in queued)
    with pytest.raises(EngineClosedError):
        small.submit("more")
    small.close()  # twice is fine
    assert engine.generate(["still here?"], max_tokens=2)[0].ok  # shared weights survive


def test_five_load_close_cycles_do_not_grow_memory(model_path: Path) -> None:
    """Freed heap that glibc keeps is not a leak: trim it before each reading, or RSS jumps by tens of MiB."""
    process = psutil.Process()
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        trim = None
    rss = []
    for _ in range(5):
        with Engine.load(model_path, parallel=2, ctx=256) as e:
            assert e.generate(["Hello"], max_tokens=4)[0].ok
        gc.collect()
        if trim is not None:
            trim(0)
        rss.append(process.memory_info().rss)
    growth = rss[-1] - rss[1]
    assert growth < 40 * 1024 * 1024, (
        f"RSS grew by {growth / 2**20:.1f} MiB over cycles 2..5: {rss}"
    )


def test_close_from_a_snapshot_subscriber_frees_the_engine(engine: Engine) -> None:
    small = engine.spawn(parallel=1, ctx=128)
    closed = threading.Event()

    def close_once(snapshot: object) -> None:
        if not closed.is_set():
            closed.set()
            small.close()

    small.subscribe(close_once, interval=0.05)
    small.generate(["hi"], max_tokens=2)
    wait_until(lambda: small.closed, timeout=10)
    with pytest.raises(EngineClosedError):
        small.tokenize("after close")
    assert engine.generate(["the shared weights still work"], max_tokens=2)[0].ok


def test_close_from_two_threads_at_once_releases_the_weights_once(engine: Engine) -> None:
    small = engine.spawn(parallel=2, ctx=128)
    small.submit("A long tale:", max_tokens=300)
    threads = [threading.Thread(target=small.close) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert small.closed and not any(t.is_alive() for t in threads)
    assert engine.generate(["still loaded?"], max_tokens=2)[
        0
    ].ok  # a double release would free them


def test_a_batch_larger_than_the_queue_is_refused_by_submit_many_and_fed_by_generate(
    engine: Engine,
) -> None:
    with engine.spawn(parallel=1, ctx=128, max_queue=3) as small:
        with pytest.raises(QueueFullError, match="4 prompts at once are more than the queue holds"):
            small.submit_many(["a"] * 4, max_tokens=2)
        results = small.generate([f"{n}" for n in range(6)], max_tokens=2)  # fed as the queue drains
        assert [r.prompt for r in results] == [f"{n}" for n in range(6)] and all(r.ok for r in results)
    with pytest.raises(InvalidParamsError, match="max_queue=0"):
        engine.spawn(parallel=1, max_queue=0)


def test_submit_many_queues_in_one_step_and_repeats_exactly(idle_engine: Engine) -> None:
    prompts = PROMPTS[:6]
    first = [h.result() for h in idle_engine.submit_many(prompts, max_tokens=20, temperature=0.0)]
    second = [h.result() for h in idle_engine.submit_many(prompts, max_tokens=20, temperature=0.0)]
    assert [r.text for r in first] == [r.text for r in second]
    assert [r.text for r in first] == [
        r.text for r in idle_engine.generate(prompts, max_tokens=20, temperature=0.0)
    ]
    with pytest.raises(InvalidParamsError, match="list of prompts"):
        idle_engine.submit_many("one prompt", max_tokens=4)


def test_a_failure_in_one_slots_token_handling_ends_that_request_alone(
    idle_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inject a fault into the text handling of one request: it fails, the loop and the others go on."""
    from nbollama._core import _loop as engine_module
    from nbollama._core._text import TextStream

    class Faulty(TextStream):
        def feed(self, piece: bytes) -> str:
            if "<<inject>>" in self.stops and len(self.text) > 8:
                raise RuntimeError("injected fault")
            return super().feed(piece)

    monkeypatch.setattr(engine_module, "TextStream", Faulty)
    handles = idle_engine.submit_many(PROMPTS[:3], max_tokens=24, temperature=0.0)
    victim = idle_engine.submit(
        "Write a long story about a lighthouse.",
        max_tokens=40,
        temperature=0.0,
        stop=["<<inject>>"],
    )
    results = [h.result(timeout=60) for h in handles]
    failed = victim.result(timeout=60)
    assert failed.finish_reason == "error" and "injected fault" in (failed.error or "")
    assert failed.text  # what was streamed before the fault is kept
    assert all(r.finish_reason in ("stop", "length") for r in results)
    after = idle_engine.generate(
        PROMPTS[3:5], max_tokens=8, temperature=0.0
    )  # the engine still works
    assert all(r.ok for r in after)
    assert idle_engine.snapshot()["busy_slots"] == 0


def test_a_failing_sampler_ends_that_request_alone(
    idle_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbollama._core import _runner
    from nbollama._core._sampler import make_sampler

    class Breaks:
        def __init__(self, inner: object) -> None:
            self.inner, self.calls = inner, 0

        def sample(self, context: object, index: int) -> int:
            self.calls += 1
            if self.calls > 3:
                raise RuntimeError("sampler broke")
            return self.inner.sample(context, index)  # type: ignore[attr-defined]

        def free(self) -> None:
            self.inner.free()  # type: ignore[attr-defined]

    def maybe_breaking(params, *, n_vocab, prompt):  # type: ignore[no-untyped-def]
        inner = make_sampler(params, n_vocab=n_vocab, prompt=prompt)
        return Breaks(inner) if params.seed == 666 else inner

    monkeypatch.setattr(_runner, "make_sampler", maybe_breaking)
    ok = idle_engine.submit_many(PROMPTS[:2], max_tokens=12, temperature=0.0)
    bad = idle_engine.submit("Count to ten:", max_tokens=12, temperature=0.5, seed=666)
    assert bad.result(timeout=60).finish_reason == "error"
    assert "sampler broke" in (bad.result().error or "")
    assert bad.result().completion_tokens == 3
    assert all(h.result(timeout=60).ok for h in ok)


def test_the_greedy_fast_path_picks_what_llama_cpp_greedy_picks(model_path: Path) -> None:
    """The numpy argmax replaces llama.cpp's greedy chain only because they agree, ties included."""
    from nbollama._api.requests import SamplingParams
    from nbollama._core._batch import Batch
    from nbollama._core._llama import LlamaContext, LlamaModel
    from nbollama._core._sampler import GreedySampler, SamplerChain

    model = LlamaModel(model_path, gpu_layers=0)
    context = LlamaContext(model, n_seq=2, ctx_per_slot=128, n_batch=128, threads=2)
    batch = Batch(128)
    fast, chain = (
        GreedySampler(),
        SamplerChain(SamplingParams(temperature=0.0), n_vocab=model.n_vocab),
    )
    try:
        for seq, text in enumerate(["The capital of France is", "def fibonacci(n):"]):
            tokens = model.tokenize(text)
            batch.clear()
            last = batch.add_span(np.asarray(tokens, dtype=np.int32), 0, seq, True) + len(tokens) - 1
            pos = len(tokens)
            for _ in range(12):
                assert context.decode(batch) == 0
                picked = fast.sample(context, last)
                assert picked == chain.sample(context, last)
                batch.clear()
                last = batch.add(picked, pos, seq, True)
                pos += 1
    finally:
        chain.free()
        context.close()
        model.close()


def test_releasing_the_callers_openmp_team_frees_its_worker_threads(model_path: Path) -> None:
    """A decode on this thread leaves an idle OpenMP team; releasing it lets libgomp count right."""
    from nbollama._core._llama import (
        Batch,
        LlamaContext,
        LlamaModel,
        _openmp_library,
        release_openmp_threads,
    )

    model = LlamaModel(model_path, gpu_layers=0)
    if _openmp_library() is None:
        model.close()
        pytest.skip("llama.cpp was built without OpenMP")
    context = LlamaContext(model, n_seq=1, ctx_per_slot=64, n_batch=64, threads=2)
    try:
        release_openmp_threads()
        before = len(os.listdir("/proc/self/task"))
        batch = Batch(64)
        batch.add_span(np.asarray(model.tokenize("Hello there"), dtype=np.int32), 0, 0, True)
        assert context.decode(batch) == 0  # on this thread: an OpenMP team of 2 appears
        assert len(os.listdir("/proc/self/task")) == before + 1
        release_openmp_threads()
        assert len(os.listdir("/proc/self/task")) == before
    finally:
        context.close()
        model.close()


def test_prompt_chunks_decoded_together_read_what_each_alone_reads(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a KV stream per slot, a step's prompt chunks go in one call, padded with throwaway
    tokens (``_batch.chunk_layout``): each prompt's first token and its log-probability are
    those of the prompt decoded alone (batch variance aside), and no throwaway token stays."""
    from nbollama._core import _streams

    laid: list[list[int]] = []
    real_layout = _streams.chunk_layout

    def spy(*args: object, **kwargs: object) -> list[int] | None:
        layout = real_layout(*args, **kwargs)  # type: ignore[arg-type]
        laid.extend([layout] if layout else [])
        return layout

    monkeypatch.setattr(_streams, "chunk_layout", spy)
    prompts = [
        "The capital of France is",
        "Water freezes at a temperature of zero degrees",
        "One, two, three, four,",
        "The opposite of hot is",
    ]
    asked = dict(max_tokens=3, temperature=0.0, logprobs=1, cache=False)
    with Engine.load(model_path, parallel=4, ctx=128) as together:
        both = together.generate(prompts, **asked)
        assert laid, "the four chunks went in one call"
        again = together.generate(prompts[:1], **asked)  # its slot's KV holds no throwaway token
    with Engine.load(model_path, parallel=1, ctx=128) as alone:
        each = [alone.generate([p], **asked)[0] for p in prompts]
    for t, a in zip([*both, *again], [*each, each[0]]):
        assert t.text == a.text, (t.text, a.text)
        assert t.logprobs and a.logprobs
        assert abs(t.logprobs[0]["logprob"] - a.logprobs[0]["logprob"]) < 0.05
