"""Batches of any size: prompts fed into a bounded queue as it drains, results in input order.

The feeding rules are tested fast against a small fake engine (a bounded
queue served by a thread); then on the real model: 2,000 prompts at
parallel 8, a queue that stays bounded, the texts of one big submit, Ctrl-C,
the progress line, the async path; and the remote engine against a fake
server whose queue is smaller than the call.
"""

from __future__ import annotations

import _thread
import io
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import pytest
from remote_fakes import Fake

from nbollama import Engine, InvalidParamsError, QueueFullError
from nbollama._api.feed import UNSENT_ID, Feeder, feed_agenerate, feed_generate, window_for
from nbollama._api.progress import (
    _TextProgress,
    elide_prefix,
    progress_html,
    progress_state,
    progress_text,
)
from nbollama._api.requests import Handle
from nbollama.remote import RemoteEngine, connect
from nbollama.results import BackgroundGeneration, Results

# -- a fake engine: a bounded queue, served `parallel` at a time by a thread ------------------


class FakeEngine:
    """``submit_many`` into a bounded queue (``QueueFullError`` past it), served by a thread.

    Each request "generates" its prompt upper-cased, in one token. Books: the
    queue's peak, every chunk's size, what was submitted.
    """

    def __init__(self, *, parallel: int = 4, max_queue: int = 16, seconds: float = 0.001) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self.seconds = seconds
        self.queue: deque[Handle] = deque()
        self.cancelled: set[int] = set()
        self.chunks: list[int] = []
        self.peak = 0
        self.refused = 0
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def submit_many(self, prompts: Sequence[str], **params: Any) -> list[Handle]:
        unknown = set(params) - {"max_tokens", "temperature"}
        if unknown:
            raise InvalidParamsError(f"unknown parameter(s) {sorted(unknown)}")
        prompts = list(prompts)
        with self._lock:
            if len(self.queue) + len(prompts) > self.max_queue:
                self.refused += 1
                raise QueueFullError(f"{len(self.queue)} waiting, {len(prompts)} more do not fit")
            handles = [Handle(next(self._ids), p, len(p), 1, self._cancel) for p in prompts]
            self.queue.extend(handles)
            self.chunks.append(len(handles))
            self.peak = max(self.peak, len(self.queue))
            self._lock.notify_all()
        return handles

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            if handle in self.queue:
                self.queue.remove(handle)
                queued = True
            else:
                self.cancelled.add(handle.id)
                queued = False
        if queued:
            handle._finish("cancelled")

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self.queue and not self._closing:
                    self._lock.wait()
                if self._closing:
                    return
                batch = [self.queue.popleft() for _ in range(min(self.parallel, len(self.queue)))]
            for slot, handle in enumerate(batch):
                handle._set_running(slot, "generating")
            time.sleep(self.seconds)
            for handle in batch:
                if handle.id in self.cancelled:
                    handle._finish("cancelled")
                    continue
                handle._publish(handle.prompt.upper(), 1)
                handle._finish("length")

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join()


@pytest.fixture
def fake() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    yield engine
    engine.close()


def test_the_window_is_four_per_slot_at_least_64_never_past_the_queue() -> None:
    assert window_for(1, 512) == 64 and window_for(8, 512) == 64 and window_for(32, 512) == 128
    assert window_for(8, 16) == 16 and window_for(8, 1) == 1


def test_any_number_of_prompts_flow_through_a_small_queue_in_order(fake: FakeEngine) -> None:
    prompts = [f"prompt {i}" for i in range(3000)]
    results = feed_generate(fake.submit_many, prompts, {"max_tokens": 1}, window=16)
    assert [r.prompt for r in results] == prompts
    assert [r.text for r in results] == [p.upper() for p in prompts]
    assert fake.peak <= fake.max_queue and fake.refused == 0
    # topped up in big chunks (half a window at least), never one by one
    assert fake.chunks[0] == 16 and all(c >= 8 for c in fake.chunks[:-1]), fake.chunks


def test_a_queue_others_keep_full_is_waited_out(fake: FakeEngine) -> None:
    others = fake.submit_many([f"other {i}" for i in range(16)])  # the queue is full now
    results = feed_generate(fake.submit_many, ["a", "b", "c"], {}, window=16)
    assert [r.text for r in results] == ["A", "B", "C"] and fake.refused >= 1
    assert all(h.result(timeout=5).ok for h in others)


def test_bad_input_raises_before_anything_is_queued(fake: FakeEngine) -> None:
    with pytest.raises(InvalidParamsError, match="unknown parameter"):
        feed_generate(fake.submit_many, ["a"] * 100, {"max_tokenz": 3}, window=16)
    with pytest.raises(InvalidParamsError, match="prompt 2 must be a str, got int"):
        feed_generate(fake.submit_many, ["a", "b", 3], {}, window=16)  # type: ignore[list-item]
    assert fake.chunks == []
    assert feed_generate(fake.submit_many, [], {}, window=16) == []
    assert [r.text for r in feed_generate(fake.submit_many, "one", {}, window=16)] == ["ONE"]


def test_cancel_keeps_what_finished_and_sends_nothing_more() -> None:
    slow = FakeEngine(parallel=2, max_queue=8, seconds=0.05)
    try:
        prompts = [f"p{i}" for i in range(100)]
        feeder = Feeder(prompts, slow.submit_many, window=8)
        while feeder.done < 6:
            feeder.poll(0.05)
        results = feeder.cancel(timeout=5)
        assert [r.prompt for r in results] == prompts and feeder.finished
        done = [r for r in results if r.ok]
        assert len(done) >= 6 and all(r.text == r.prompt.upper() for r in done)
        unsent = [r for r in results if r.id == UNSENT_ID]
        assert unsent and all(r.finish_reason == "cancelled" and not r.text for r in unsent)
        assert feeder.sent < 100 and sum(slow.chunks) == feeder.sent
        assert not slow.queue, "nothing of the call is left waiting"
        assert feeder.stop() == 0  # twice is fine
    finally:
        slow.close()


def test_memory_per_finished_prompt_is_its_result(fake: FakeEngine) -> None:
    feeder = Feeder([f"p{i}" for i in range(500)], fake.submit_many, window=16)
    feeder.run()
    items = feeder.items
    assert all(type(item).__name__ == "Result" for item in items)  # no handle is kept
    assert feeder.handles == [] and feeder.done == 500 and feeder.tokens == 500


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_agenerate_feeds_from_an_event_loop(fake: FakeEngine, backend: str) -> None:
    prompts = [f"q{i}" for i in range(400)]

    async def main() -> list[str]:
        results = await feed_agenerate(fake.submit_many, prompts, {}, window=16)
        return [r.text for r in results]

    assert anyio.run(main, backend=backend) == [p.upper() for p in prompts]
    assert fake.peak <= 16


def test_progress_views_stay_small_whatever_the_number_of_prompts() -> None:
    slow = FakeEngine(parallel=4, max_queue=16, seconds=0.002)
    try:
        prompts = [
            f"Classify this review as positive or negative: review number {i}" for i in range(3000)
        ]
        feeder = Feeder(prompts, slow.submit_many, window=16)
        elide = elide_prefix(prompts)
        stream = io.StringIO()
        line = _TextProgress(feeder, stream)
        views: list[str] = []

        def tick() -> None:
            line.update()
            views.append(progress_html(progress_state(feeder, elide=elide)))

        feeder.run(tick, interval=0.01)
        line.close()
    finally:
        slow.close()
    written = stream.getvalue()
    assert written.startswith("\r") and written.endswith("\n") and "3000/3000" in written
    assert written.count("\n") == 1, "one line, rewritten in place"
    assert prompts[0][elide:] == "0"  # the template is elided, the number shown
    assert max(len(v) for v in views) < 10_000
    assert any("…12" in v or "…1" in v for v in views), (
        "the slots' prompts show their differing end"
    )
    state = progress_state(feeder, elide=elide)
    assert state.finished and state.done == 3000 and state.eta is None and not state.running
    assert "3000/3000" in progress_html(state) and "3000/3000" in progress_text(state)


def test_elide_prefix_keeps_the_differing_words() -> None:
    template = "Answer for a ten-year-old, in one sentence: "
    prompts = [template + q for q in ("Why is the sky blue?", "What is gravity?")]
    cut = elide_prefix(prompts)
    assert cut == len(template) and [p[cut:] for p in prompts][1] == "What is gravity?"
    assert elide_prefix(["short a", "short b"]) == 0  # not worth hiding
    assert elide_prefix(["only one prompt here, long enough to matter"]) == 0
    same = ["The same long prompt, twice over and again"] * 2
    assert same[0][elide_prefix(same) :] == "again"


def test_background_generation_over_a_feeder(fake: FakeEngine) -> None:
    feeder = Feeder([f"p{i}" for i in range(50)], fake.submit_many, window=16)
    job = BackgroundGeneration(out="x", feeder=feeder)
    assert "50 prompts running" in repr(job) and "out='x'" in repr(job)
    feeder.run()
    job._complete(Results(feeder.results()))
    assert job.done() and len(job.wait(timeout=1)) == 50 and job.cancel() == 0


# -- Results: big tables stay small, pandas joins -------------------------------------------------


def _results(n: int) -> Results:
    fake = FakeEngine(parallel=8, max_queue=64)
    try:
        return Results(
            feed_generate(fake.submit_many, [f"row {i}" for i in range(n)], {}, window=64)
        )
    finally:
        fake.close()


def test_a_long_results_table_shows_a_summary_and_the_first_and_last_rows() -> None:
    results = _results(1000)
    table = results._repr_html_()
    assert len(table) < 20_000 and table.count("<tr>") < 25
    assert "… 990 more rows" in table and "row 0".upper() in table and "ROW 999" in table
    assert "p50" in table and "p99" in table and "TTFT" in table
    text = repr(results)
    assert len(text.splitlines()) < 20 and "990 more" in text
    small = _results(3)._repr_html_()
    assert small.count("<tr>") == 4 and 'style="white-space:nowrap"' in small


def test_to_pandas_joins_back_onto_the_input_frame() -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"review": ["good", "bad", "fine"]}, index=[10, 20, 30])
    results = Results(_results(3), index=frame.index)
    assert list(results.to_pandas().index) == [10, 20, 30]
    joined = results.to_pandas(join=frame)
    assert list(joined.columns[:2]) == ["review", "id"] and list(joined.index) == [10, 20, 30]
    assert list(joined["text"]) == ["ROW 0", "ROW 1", "ROW 2"]
    subset = results[1:].to_pandas(join=frame)  # on the labels: the first row has no result
    assert subset["text"].isna().tolist() == [True, False, False]
    plain = Results(_results(3))  # no index: row by row, when the lengths match
    assert list(plain.to_pandas(join=frame)["text"]) == ["ROW 0", "ROW 1", "ROW 2"]
    with pytest.raises(InvalidParamsError, match="row by row"):
        plain.to_pandas(join=frame.iloc[:2])
    with pytest.raises(InvalidParamsError, match="3 labels for 2 results"):
        Results(_results(2), index=[1, 2, 3])


# -- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight(engine: Engine) -> Iterator[Engine]:
    """Eight slots on the shared weights, small contexts."""
    with engine.spawn(parallel=8, ctx=128) as spawned:
        yield spawned


def test_2000_prompts_at_parallel_8_all_in_order(eight: Engine) -> None:
    prompts = [f"Item {i}:" for i in range(2000)]
    started = time.perf_counter()
    results = eight.generate(prompts, max_tokens=2, temperature=0.0)
    elapsed = time.perf_counter() - started
    assert len(results) == 2000 and [r.prompt for r in results] == prompts
    assert all(r.ok and r.completion_tokens >= 1 for r in results)
    assert len({r.id for r in results}) == 2000
    print(f"2000 prompts x 2 tokens at parallel 8: {elapsed:.1f} s")
    snap = eight.snapshot()
    assert snap["busy_slots"] == 0 and snap["queue"]["length"] == 0


def test_the_queue_stays_bounded_while_600_prompts_flow(engine: Engine) -> None:
    lengths: list[int] = []
    stop = threading.Event()

    def watch(small: Engine) -> None:
        while not stop.is_set():
            lengths.append(len(small._scheduler.queue))
            time.sleep(0.002)

    with engine.spawn(parallel=4, ctx=128, max_queue=24) as small:
        watcher = threading.Thread(target=watch, args=(small,))
        watcher.start()
        try:
            results = small.generate([f"Count {i}:" for i in range(600)], max_tokens=1)
        finally:
            stop.set()
            watcher.join()
        assert len(results) == 600 and all(r.ok for r in results)
        assert max(lengths) <= 24 and max(lengths) >= 12, max(lengths)
        # a single submit_many past the queue is still refused, whole
        with pytest.raises(QueueFullError, match="more than the queue holds"):
            small.submit_many(["x"] * 25, max_tokens=1)
        assert small.snapshot()["queue"]["length"] == 0


def test_fed_in_chunks_gives_the_texts_of_one_big_submit(engine: Engine) -> None:
    with engine.spawn(parallel=4, ctx=256, max_queue=512) as four:
        prompts = [f"Fact {i} about the sea:" for i in range(100)]
        params = {"max_tokens": 4, "temperature": 0.0}
        at_once = [h.result() for h in four.submit_many(prompts, **params)]
        fed = four.generate(prompts, **params)  # window 64: a first chunk, then top-ups
        assert [r.text for r in fed] == [r.text for r in at_once]


def test_ctrl_c_keeps_the_finished_results_and_frees_the_slots(engine: Engine) -> None:
    prompts = [f"Tell a story number {i}:" for i in range(1000)]
    with engine.spawn(parallel=4, ctx=128) as four:

        def interrupt_after_some() -> None:
            deadline = time.monotonic() + 60
            while four.snapshot()["totals"]["completed"] < 12 and time.monotonic() < deadline:
                time.sleep(0.02)
            _thread.interrupt_main()

        threading.Thread(target=interrupt_after_some, daemon=True).start()
        with pytest.raises(KeyboardInterrupt) as caught:
            four.generate(prompts, max_tokens=3, temperature=0.0)
        results = caught.value.results  # type: ignore[attr-defined]
        assert isinstance(results, Results) and [r.prompt for r in results] == prompts
        finished = [r for r in results if r.ok]
        assert len(finished) >= 12 and all(r.text for r in finished)
        assert {r.finish_reason for r in results} <= {"length", "stop", "cancelled"}
        assert sum(r.id == UNSENT_ID for r in results) > 800
        snap = four.snapshot()
        assert snap["busy_slots"] == 0 and snap["queue"]["length"] == 0
        assert four.generate(["After:"], max_tokens=2)[0].ok


def test_progress_true_writes_one_line_to_stderr(
    idle_engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    results = idle_engine.generate([f"Colour {i}:" for i in range(20)], max_tokens=2, progress=True)
    assert len(results) == 20
    err = capsys.readouterr().err
    assert err.startswith("\rnbollama [") and err.endswith("\n") and "20/20" in err


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_agenerate_past_the_queue(engine: Engine, backend: str) -> None:
    with engine.spawn(parallel=2, ctx=128, max_queue=8) as small:
        prompts = [f"Word {i}:" for i in range(40)]

        async def main() -> list[str]:
            return [r.prompt for r in await small.agenerate(prompts, max_tokens=1)]

        assert anyio.run(main, backend=backend) == prompts


# -- the remote engine, against a fake server -----------------------------------------------------


def test_remote_generate_takes_more_prompts_than_its_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NBOLLAMA_MAX_QUEUE", "5")
    with Fake("ollama", parallel=2, token_seconds=0.001, tokens=2) as fake:
        engine = connect(fake.url, max_inflight=2)
        try:
            assert isinstance(engine, RemoteEngine)
            prompts = [f"question {i}" for i in range(40)]
            results = engine.generate(prompts, max_tokens=2)
            assert [r.prompt for r in results] == prompts and all(r.ok for r in results)
            assert fake.books.max_open <= 2 and engine.snapshot()["queue"]["length"] == 0
            with pytest.raises(QueueFullError, match="holds 5 requests"):
                engine.submit_many(["x"] * 8, max_tokens=2)

            async def main() -> int:
                return len(await engine.agenerate(prompts[:12], max_tokens=2))

            assert anyio.run(main) == 12
        finally:
            engine.close()
