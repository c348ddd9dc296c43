"""The parallelism sweep on the real model (tiny sizes), and its recommendation rule."""

from __future__ import annotations

from nbollama import Engine
from nbollama.bench import SweepRow, recommend, sweep


def row(parallel: int, throughput: float, ttft: float = 1.0) -> SweepRow:
    return SweepRow(parallel, 8, 100, 1.0, throughput, ttft, ttft, 10.0, 1, "host", 1)


def test_recommendation_is_the_smallest_within_ten_percent_of_the_best() -> None:
    rows = [row(1, 50.0), row(2, 80.0), row(4, 95.0), row(8, 100.0)]
    assert recommend(rows)[0] == 4
    parallel, reason = recommend([row(1, 50.0), row(2, 100.0), row(4, 80.0)])
    assert parallel == 2 and "highest throughput" in reason


def test_sweep_reuses_the_weights_and_measures_each_value(engine: Engine) -> None:
    result = sweep(engine, parallel=[2, 1], n_prompts=4, max_tokens=6, progress=False)
    assert [r.parallel for r in result.rows] == [1, 2]
    for r in result.rows:
        assert r.requests == 4 and r.completion_tokens > 0
        assert r.throughput > 0 and r.mean_ttft > 0 and r.peak_memory > 0
    assert result.rows[1].kv_bytes > result.rows[0].kv_bytes  # memory scales with parallel
    assert result.recommended in (1, 2)
    assert "parallel" in result._repr_html_() and str(result.recommended) in str(result)
    fig = result.figure()
    assert [t.name for t in fig.data][0] == "throughput (tok/s)"
    assert not engine.closed and engine.parallel == 4  # the engine it ran on is untouched
