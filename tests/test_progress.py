"""The compact progress view's figures: what ran against what the store gave, and the unit of work."""

from __future__ import annotations

from nbollama._api.progress import ProgressState, progress_line


def _state(**fields: object) -> ProgressState:
    base: dict[str, object] = dict(
        total=100, sent=100, done=40, errors=0, cancelled=0, tokens=400, elapsed=10.0,
        running=(), latest=(), finished=False, stopped=False,
    )  # fmt: skip
    return ProgressState(**{**base, **fields})  # type: ignore[arg-type]


def test_a_generating_call_counts_tokens() -> None:
    line = progress_line(_state())
    assert "400 tokens · 40.0 tok/s" in line and "ETA 0:15" in line


def test_a_scored_call_counts_prompts_not_zero_tokens() -> None:
    """A --choices cell generates nothing: 'prompts/s', never '0 tokens · 0.0 tok/s'."""
    line = progress_line(_state(tokens=0))
    assert "4.0 prompts/s" in line and "tok/s" not in line and "0 tokens" not in line


def test_replayed_rows_are_said_and_left_out_of_the_pace() -> None:
    state = _state(done=60, replayed=40, tokens=200, store_note="resumed 40 of 100 from the store")
    line = progress_line(state)
    assert line.index("resumed 40 of 100 from the store") < line.index("200 tokens")
    # 20 rows ran in 10 s: 40 left take 20 s (the 40 replayed took no time)
    assert state.eta == 20.0 and "ETA 0:20" in line


def test_all_replayed_has_no_pace_to_guess_from() -> None:
    state = _state(done=30, replayed=30, tokens=0, store_note="30 cached")
    assert state.eta is None and "30 cached" in progress_line(state)


def test_forced_tokens_are_said_beside_the_count() -> None:
    assert "400 tokens (120 forced) · 40.0 tok/s" in progress_line(_state(forced=120))
