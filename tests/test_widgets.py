"""The inline dashboard against the real engine and model: what it shows must be what happened.

No engine mocks: every snapshot here comes from the shared Gemma 3 270M
engine (``conftest.engine``). The last test runs a notebook in a real
ipykernel (nbclient) to check that updates made on the engine's monitor
thread reach the frontend through IOPub.
"""

from __future__ import annotations

import html
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import pytest

from nbollama import Engine
from nbollama.engine import EngineSnapshot
from nbollama.session import current_engine, set_engine, use
from nbollama.widgets import Dashboard, ThroughputChart, dashboard

REPO = Path(__file__).resolve().parent.parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

PROMPTS = [
    "Count from 1 to 30, separated by commas:",
    "List the letters of the alphabet:",
    "Name ten animals:",
    "Write the numbers from 100 down to 80:",
]


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def live_dashboard(idle_engine: Engine) -> Iterator[Dashboard]:
    board = dashboard(idle_engine)
    yield board
    board.close()


def _settled(board: Dashboard, engine: Engine) -> Callable[[], bool]:
    """True once the board shows the engine idle again with every request counted."""

    def check() -> bool:
        totals = engine.snapshot()["totals"]
        return board.slots.completed + board.slots.cancelled + board.slots.errors == totals[
            "completed"
        ] + totals["cancelled"] + totals["errors"] and all(
            row.badge == "idle" for row in board.slots.rows
        )

    return check


def test_slot_rows_follow_a_real_generation(live_dashboard: Dashboard, idle_engine: Engine) -> None:
    board, engine = live_dashboard, idle_engine
    before = engine.snapshot()["totals"]
    assert [row.slot_id for row in board.slots.rows] == list(range(engine.parallel))
    assert board.status == "live" and board.parallel == engine.parallel == board.slots.parallel
    first_updates = board.updates

    results = engine.generate(PROMPTS, max_tokens=16, temperature=0.0)
    wait_for(_settled(board, engine), what="the dashboard to show every slot idle again")

    after = engine.snapshot()["totals"]
    assert board.updates > first_updates + 2, (
        "snapshots should have arrived from the monitor thread"
    )
    # counts add up with the engine's totals
    assert board.slots.submitted == after["submitted"] == before["submitted"] + len(PROMPTS)
    assert board.slots.completed == after["completed"] == before["completed"] + len(PROMPTS)
    assert board.slots.generated_tokens == after["generated_tokens"]
    assert after["generated_tokens"] - before["generated_tokens"] == sum(
        r.completion_tokens for r in results
    )
    assert board.slots.busy_slots == 0 and board.slots.queue_length == 0
    # every slot that served a request went generating -> done -> idle, in that order
    used = {r.slot for r in results}
    assert used == set(range(engine.parallel)), "4 prompts on 4 slots should use every slot"
    for result in results:
        assert result.slot is not None
        row = board.slots.rows[result.slot]
        seen = row.badges_seen
        assert "generating" in seen and seen[-1] == "idle", seen
        assert seen.index("generating") < len(seen) - 1 - seen[::-1].index("idle")
        if "done" in seen:
            assert seen.index("generating") < seen.index("done")
        assert row.request_id == result.id
        assert row.decoded_tokens == result.completion_tokens
        assert row.prompt_preview == " ".join(result.prompt.split())[:80]
    # the rows' progress bars show decoded/max of the last request
    row = board.slots.rows[results[0].slot]  # type: ignore[index]
    assert row._progress.max == 16 and row._progress.value == results[0].completion_tokens


def test_cancelled_request_shows_cancelled_badge(
    live_dashboard: Dashboard, idle_engine: Engine
) -> None:
    board, engine = live_dashboard, idle_engine
    handle = engine.submit(
        "Write a very long essay about the history of the printing press.",
        max_tokens=400,
        temperature=0.0,
    )
    wait_for(lambda: handle.status == "generating", what="the request to generate")
    slot = handle.slot
    assert slot is not None
    wait_for(
        lambda: board.slots.rows[slot].badge == "generating", what="the row to show generating"
    )
    assert board.slots.busy_slots == 1
    handle.cancel()
    wait_for(
        lambda: "cancelled" in board.slots.rows[slot].badges_seen,
        timeout=10,
        what="a cancelled badge",
    )
    wait_for(_settled(board, engine), what="the slot to be idle again")
    assert board.slots.cancelled == engine.snapshot()["totals"]["cancelled"]


def test_chart_data_matches_engine_metrics(live_dashboard: Dashboard, idle_engine: Engine) -> None:
    board, engine = live_dashboard, idle_engine
    assert board.chart is not None
    # a chart fed by its own subscription, with the snapshots it was fed kept aside
    own = ThroughputChart()
    own.reset(engine)
    fed: list[EngineSnapshot] = []
    lock = threading.Lock()

    def feed(snapshot: EngineSnapshot) -> None:
        with lock:
            fed.append(snapshot)
            own.update(snapshot)

    subscription = engine.subscribe(feed, interval=0.25)
    try:
        results = engine.generate(PROMPTS[:3], max_tokens=16, temperature=0.0)
        wait_for(
            lambda: all(r.id in board.chart.ttft_by_id for r in results),  # type: ignore[union-attr]
            what="the chart to show every request's TTFT",
        )
        wait_for(_settled(board, engine), what="the engine to settle")
    finally:
        subscription.close()
    with lock:
        assert own.throughput == [s["throughput"] for s in fed]
        assert own.busy == [s["busy_slots"] for s in fed]
        assert own.times == [s["time"] for s in fed]
        assert own.last_throughput == fed[-1]["throughput"]
        assert max(own.throughput) > 0 and max(own.busy) >= 1
    # TTFT and queue wait per request: exactly the Result values, once each
    chart = board.chart
    assert len(chart.request_ids) == len(set(chart.request_ids))
    for result in results:
        assert chart.ttft_by_id[result.id] == result.ttft
        assert chart.queue_wait[chart.request_ids.index(result.id)] == result.queue_wait
    # the figure plots exactly those lists (it is updated in place, never rebuilt)
    figure = chart.figure
    assert list(figure.data[0].y) == chart.throughput
    assert list(figure.data[1].y) == chart.busy
    assert list(figure.data[2].x) == [f"#{i}" for i in chart.request_ids]
    assert list(figure.data[2].y) == chart.ttft
    assert list(figure.data[3].y) == chart.queue_wait
    assert chart.last_throughput == chart.throughput[-1] == board.slots.throughput
    assert chart.times[-1] - chart.times[0] <= chart.window + 1


def test_browser_messages_wait_for_a_redraw_in_progress() -> None:
    """plotly's answers from the browser (main thread) never edit the figure mid-redraw (monitor thread)."""
    chart = ThroughputChart()
    try:
        held = threading.Event()

        def redraw_in_progress() -> None:
            with chart.figure_lock:
                held.set()
                time.sleep(0.3)

        worker = threading.Thread(target=redraw_in_progress)
        worker.start()
        held.wait()
        started = time.perf_counter()
        chart.figure._js2py_relayout = {
            "relayout_data": {"yaxis.range": [0, 5]},
            "source_view_id": None,
        }
        waited = time.perf_counter() - started
        worker.join()
        assert waited >= 0.2, "the browser's relayout should have waited for the redraw"
        assert tuple(chart.figure.layout.yaxis.range) == (0, 5)  # and then applied, once
        assert chart.figure._js2py_relayout is None
    finally:
        chart.close()


def test_the_chart_fills_its_box() -> None:
    """plotly's widget draws at 700 px before it is on the page; the chart must follow its box."""
    from nbollama.widgets._chart import FitToBox

    chart = ThroughputChart()
    try:
        layout = chart.figure.layout
        assert layout.width is None, "a fixed width is cut off in a narrow notebook"
        assert chart.figure._config.get("responsive") is True, "plotly resizes only when responsive"
        fitters = [c for c in chart.children if isinstance(c, FitToBox)]
        assert len(fitters) == 1 and chart.children[0] is chart.figure
        assert "nbollama-fit-box" in chart._dom_classes
        assert fitters[0].layout.display == "none", "the fitter takes no room"
        esm = fitters[0]._esm
        assert "ResizeObserver" in esm and "nbollama-fit-box" in esm
        assert "_responsiveChartHandler" in esm
    finally:
        chart.close()


def test_the_chart_marks_adaptive_parallel_changes(idle_engine: Engine) -> None:
    """Each change of the active slots is a step of the dotted line and a marker with the new count."""
    chart = ThroughputChart()
    try:
        chart.reset(idle_engine)
        base = idle_engine.snapshot()
        assert base["adaptive"] is None
        chart.update(base)
        assert not chart.adaptive and chart.figure.data[5].visible is False
        now = base["time"]
        changes = [
            {"time": now - 600, "parallel": 2, "reason": "parallel=2 of 4: long ago"},  # out of the window
            {"time": now - 20, "parallel": 4, "reason": "parallel=4 of 4: per-request 40.0 tok/s at 2, floor 15, more demand"},
            {"time": now - 5, "parallel": 3, "reason": "parallel=3 of 4: per-request 12.0 tok/s at 4, floor 15"},
        ]
        adaptive = {
            **base,
            "time": now + 0.25,
            "seq": base["seq"] + 1,
            "parallel": 3,
            "parallel_max": 4,
            "adaptive": {"target": "min_tps=15", "history": changes},
        }
        chart.update(adaptive)  # type: ignore[arg-type]
        assert chart.adaptive and chart.active[-1] == 3 and chart.parallel == 4
        assert chart.changes == [(c["time"], c["parallel"], c["reason"]) for c in changes[1:]]
        active, marks = chart.figure.data[4], chart.figure.data[5]
        assert active.visible is True and list(active.y)[-1] == 3
        assert marks.visible is True and list(marks.y) == [4, 3]
        assert list(marks.text) == ["→4", "→3"]
        assert list(marks.hovertext) == [c["reason"] for c in changes[1:]]
        assert marks.yaxis == "y2", "the markers sit on the slots axis"
    finally:
        chart.close()


def test_the_sweep_figure_marks_the_recommendation_where_it_is() -> None:
    """On the log x axis the line is at x and its label at log10(x); the axes stay in range."""
    import math

    from nbollama.bench import SweepResult, SweepRow

    def row(parallel: int, throughput: float, ttft: float, tps: float) -> SweepRow:
        return SweepRow(parallel, 16, 512, 10.0, throughput, ttft, ttft * 2, tps, 1 << 30, "host", 1 << 20)

    sweep = SweepResult(
        rows=[row(1, 18.0, 0.2, 18.0), row(2, 30.0, 0.5, 15.0), row(4, 44.0, 1.1, 11.0), row(8, 46.0, 2.5, 6.0)],
        recommended=4,
        reason="test",
    )
    fig = sweep.figure()
    (line,) = fig.layout.shapes
    assert line.x0 == line.x1 == 4 and line.xref == "x" and line.yref == "paper"
    (label,) = [a for a in fig.layout.annotations if "recommended" in a.text]
    assert label.text == "recommended: 4"
    assert label.x == pytest.approx(math.log10(4)), "annotations on a log axis are placed at log10(x)"
    low, high = fig.layout.xaxis.range
    assert low < 0 < math.log10(8) < high < 1.2, "the x range hugs the values swept"
    assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.tickvals) == [1, 2, 4, 8]
    assert fig.layout.yaxis.rangemode == "tozero" and fig.layout.yaxis2.rangemode == "tozero", (
        "no negative tick on either y axis"
    )
    one = SweepResult(rows=[row(2, 30.0, 0.5, 15.0)], recommended=2, reason="only one").figure()
    low, high = one.layout.xaxis.range
    assert low < math.log10(2) < high and high - low < 1


def test_closing_stops_updates(idle_engine: Engine) -> None:
    engine = idle_engine
    closed_board, stopped_board = dashboard(engine), dashboard(engine, compact=True)
    open_board = dashboard(engine, compact=True)
    boards = (closed_board, stopped_board, open_board)
    try:
        engine.generate(PROMPTS[:1], max_tokens=4, temperature=0.0)
        for board in boards:
            wait_for(_settled(board, engine), what="every dashboard to settle")
        closed_board.close()
        stopped_board.stop()
        assert closed_board.status == "closed" and not closed_board.live
        assert closed_board.comm is None  # its widgets are gone from the frontend
        assert stopped_board.status == "stopped" and not stopped_board.live
        assert stopped_board.comm is not None and "stopped" in stopped_board._header.value

        def state(board: Dashboard) -> tuple[int, int, int]:
            return board.updates, board.snapshot_seq, board.slots.completed

        frozen = {id(board): state(board) for board in (closed_board, stopped_board)}
        open_updates = open_board.updates
        engine.generate(PROMPTS[:2], max_tokens=4, temperature=0.0)
        wait_for(_settled(open_board, engine), what="the open dashboard to settle")
        time.sleep(0.6)
        for board in (closed_board, stopped_board):
            assert state(board) == frozen[id(board)]
        assert open_board.updates > open_updates and open_board.live
        assert open_board.slots.completed == engine.snapshot()["totals"]["completed"]
    finally:
        for board in boards:
            board.close()


def test_compact_and_memory(idle_engine: Engine) -> None:
    engine = idle_engine
    full, compact = dashboard(engine), dashboard(engine, compact=True)
    try:
        snap = engine.snapshot()
        assert compact.compact and compact.chart is None and compact.memory is None
        summary = compact._summary.value  # type: ignore[union-attr]
        assert "tok/s" in summary and "KV" in summary and ("RSS" in summary or "VRAM" in summary)
        assert len(compact.slots.rows) == engine.parallel
        assert full.memory is not None
        memory = full.memory
        assert memory.kv_bytes == engine.kv_bytes == snap["memory"]["kv_bytes"]
        assert (
            memory.kv_estimate == engine.kv_estimate
            and f"{engine.parallel} slots x {engine.ctx} ctx" in memory.kv_estimate
        )
        assert memory.source == snap["memory"]["source"]
        assert engine.kv_estimate in memory.html and "parallel x ctx/slot" in memory.html
        assert memory.note and html.escape(memory.note.split(" (")[0]) in memory.html
        if memory.source == "host":
            assert (
                memory.process_rss > 0
                and "process RSS" in memory.html
                and "RAM available" in memory.html
            )
        else:
            assert memory.gpus and "GPU 0" in memory.html
        header = full._header.value
        assert engine.model_name in header and engine.parallel_reason in header
        assert f"ctx/slot <b>{engine.ctx}</b>" in header
        assert WIDGET_VIEW in full._repr_mimebundle_()
    finally:
        full.close()
        compact.close()


def test_follows_the_session_engine(idle_engine: Engine) -> None:
    previous = current_engine()
    set_engine(None, close_previous=False)
    board = dashboard()
    try:
        assert board.following_session and board.status == "no engine"
        assert "%nbollama load" in board._header.value and board.slots.rows == []
        set_engine(idle_engine, close_previous=False)
        assert board.status == "live" and board.engine is idle_engine
        assert len(board.slots.rows) == idle_engine.parallel and board.updates >= 1
        seq = board.snapshot_seq
        set_engine(None, close_previous=False)
        assert board.status == "no engine" and board.engine is None and not board.live
        # the last engine's figures stay (a saved notebook keeps the run it watched), said so
        assert len(board.slots.rows) == idle_engine.parallel and board.snapshot_seq == seq
        assert "No engine is loaded now" in board._header.value
        assert idle_engine.model_name in board._header.value
        set_engine(idle_engine, close_previous=False)  # a new engine: shown afresh
        assert board.status == "live" and "No engine" not in board._header.value
    finally:
        board.close()
        set_engine(previous, close_previous=False)
    assert not idle_engine.closed


def test_the_dashboard_has_a_selector_when_the_kernel_has_several_engines(idle_engine: Engine) -> None:
    previous = current_engine()
    set_engine(None, close_previous=False)
    second = idle_engine.spawn(parallel=3, ctx=256)
    board = dashboard()
    try:
        set_engine(idle_engine, close_previous=False)
        assert board.selector.layout.display == "none"  # one engine: no selector
        set_engine(second, name="second")
        assert board.selector.layout.display == ""
        assert [value for _, value in board.selector.options] == ["default", "second"]
        assert board.selector.options[0][0].startswith("default (default) · ")
        assert board.engine is idle_engine and board.selector.value == "default"
        assert board.pinned == "" and board.follow_button.layout.display == "none"
        board.selector.value = "second"  # the user picks the other engine: pinned to it
        assert board.engine is second and len(board.slots.rows) == 3
        assert board.pinned == "second" and "pinned to 'second'" in board._pin_note.value
        assert board.follow_button.layout.display == ""
        use("second")
        use("default")  # a pinned dashboard does not follow %nbollama use
        assert board.engine is second and board.pinned == "second"
        board.follow_button.click()  # "follow the default"
        assert board.engine is idle_engine and board.pinned == "" and board.selector.value == "default"
        assert board.follow_button.layout.display == "none" and board._pin_note.value == ""
        use("second")  # following again
        assert board.engine is second and board.selector.value == "second"
        use("default")
        board.selector.value = "second"
        set_engine(None, name="second")  # unloaded: back to the default, selector hidden, pin gone
        assert board.engine is idle_engine and board.selector.layout.display == "none"
        assert board.pinned == "" and board._engine_bar.layout.display == "none"
    finally:
        board.close()
        if not second.closed:
            set_engine(None, name="second")
        set_engine(previous, close_previous=False)
    assert not idle_engine.closed


def test_engine_close_marks_the_dashboard(model_path: Path) -> None:
    engine = Engine.load(model_path, parallel=1, ctx=64)
    board = dashboard(engine)
    try:
        assert board.status == "live" and len(board.slots.rows) == 1
        engine.close()
        assert board.status == "engine closed" and board.slots.engine_closed and not board.live
        assert board.chart is not None and board.chart.engine_closed
        late = dashboard(engine, compact=True)  # made for an engine that is already closed
        assert late.status == "engine closed" and not late.live
        late.close()
    finally:
        board.close()
        engine.close()


NOTEBOOK_CELLS = [
    "import threading, time\nimport nbollama\nfrom nbollama.widgets import dashboard\n"
    "engine = nbollama.load(parallel=4, ctx=512)",
    "board = dashboard()\nboard",
    "threads = set()\n"
    "board.slots.observe(lambda change: threads.add(threading.current_thread().name), 'snapshot_seq')\n"
    "results = nbollama.generate(['Count from 1 to 20:', 'Name three colours:'], max_tokens=12, temperature=0)\n"
    "deadline = time.time() + 30\n"
    "while board.slots.completed < len(results) and time.time() < deadline:\n"
    "    time.sleep(0.1)\n"
    "time.sleep(0.6)\n"
    "print('completed', board.slots.completed, 'status', board.status, 'threads', sorted(threads))",
    "board.close()\nnbollama.unload()",
]


@pytest.mark.notebook
def test_dashboard_notebook_executes_in_a_real_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient import NotebookClient

    python = REPO / ".venv" / "bin" / "python"
    kernel_dir = tmp_path / "jupyter" / "kernels" / "nbollama-venv"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [
                    str(python if python.exists() else sys.executable),
                    "-m",
                    "ipykernel_launcher",
                    "-f",
                    "{connection_file}",
                ],
                "display_name": "nbollama (venv)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in NOTEBOOK_CELLS]
    path = tmp_path / "dashboard.ipynb"
    NotebookClient(
        nb,
        kernel_name="nbollama-venv",
        timeout=240,
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    nbformat.write(nb, path)

    saved = nbformat.read(path, as_version=4)
    view = [o for o in saved.cells[1].outputs if WIDGET_VIEW in o.get("data", {})]
    assert view, saved.cells[1].outputs
    printed = "".join(
        o.get("text", "") for o in saved.cells[2].outputs if o.get("output_type") == "stream"
    )
    assert "completed 2" in printed and "status live" in printed, printed
    assert "nbollama-monitor" in printed, "updates should come from the engine's monitor thread"
    # The widget state nbclient saved comes from the comm messages it saw. The
    # progress bars were created at 0/1 in cell 2; only the monitor thread set
    # them to 12 tokens, so seeing that means those messages crossed IOPub.
    state = saved.metadata["widgets"][WIDGET_STATE]["state"]
    bars = [m["state"] for m in state.values() if m["model_name"] == "IntProgressModel"]
    assert len(bars) >= 4
    assert any(bar.get("max") == 12 and bar.get("value", 0) > 0 for bar in bars), bars


SLOW_IMPORT_CELLS = [
    "import logging, pathlib, sys, tempfile\n"
    "import nbollama\n"
    "class Keep(logging.Handler):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.records = []\n"
    "    def emit(self, record):\n"
    "        self.records.append(record)\n"
    "kept = Keep()\n"
    "logging.getLogger('nbollama').addHandler(kept)\n"
    "engine = nbollama.load(parallel=4, ctx=512)",
    "board = nbollama.dashboard()\nboard",
    # pandas as plotly finds it mid-import: in sys.modules, without its classes yet, for 2.5 s
    "slow = pathlib.Path(tempfile.mkdtemp())\n"
    "(slow / 'pandas').mkdir()\n"
    "(slow / 'pandas' / '__init__.py').write_text(\n"
    "    'import time\\ntime.sleep(2.5)\\nclass Series: pass\\nclass Index: pass\\nclass DataFrame: pass\\n')\n"
    "sys.path.insert(0, str(slow))\n"
    "job = engine.submit_many(['Count from 1 to 60:', 'List twenty animals:', 'Write a poem about rain:',\n"
    "                          'Explain photosynthesis:'], max_tokens=64, temperature=0)\n"
    "import pandas  # the dashboard keeps redrawing meanwhile",
    "results = [h.result() for h in job]\n"
    "import time\n"
    "time.sleep(1.5)  # a deferred redraw has happened by now\n"
    "assert all(r.ok for r in results)\n"
    "assert not [r.getMessage() for r in kept.records], [r.getMessage() for r in kept.records]\n"
    "assert len(board.chart.times) > 2 and list(board.chart.figure.data[0].y) == list(board.chart.throughput)\n"
    "print('chart points', len(board.chart.times))",
    "board.close()\nnbollama.unload()",
]


@pytest.mark.notebook
def test_a_dashboard_redraw_never_races_the_users_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quickstart's traceback: the chart redrew while the cell imported pandas."""
    from conftest import noisy_outputs
    from nbclient import NotebookClient

    python = REPO / ".venv" / "bin" / "python"
    kernel_dir = tmp_path / "jupyter" / "kernels" / "nbollama-venv"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [str(python if python.exists() else sys.executable), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nbollama (venv)",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in SLOW_IMPORT_CELLS]
    NotebookClient(nb, kernel_name="nbollama-venv", timeout=240, resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert not noisy_outputs(nb), noisy_outputs(nb)
    printed = "".join(o.get("text", "") for o in nb.cells[3].outputs if o.get("output_type") == "stream")
    assert "chart points" in printed
