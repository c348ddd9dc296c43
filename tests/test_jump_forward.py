"""Jump-forward decoding: the tokens a format forces, decoded as one chunk, on the real bundled model.

Every run passes ``cache=False``: the result store would otherwise replay one
engine's answer to the other, and the comparison would compare nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from IPython.core.error import UsageError

from nbollama import Engine, InvalidParamsError, Result
from nbollama._api.cards import final_view
from nbollama._api.outputs import TokenLogprob
from nbollama._api.progress import LatestRow, ProgressState, progress_text
from nbollama._api.tokenview import token_view_html
from nbollama._core import _intake
from nbollama._core._jump import StepTimes
from nbollama._core._logits import masked_argmax
from nbollama._core._masks import FormatMasks
from nbollama.magics._parse_nbollama import parse_nbollama

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["sentiment", "stars", "tags"],
    "additionalProperties": False,
}
PROMPTS = [
    f"Review: The {thing} was {word}, I would say so to anyone.\nAs JSON:"
    for thing, word in [("film", "great"), ("meal", "awful"), ("hotel", "lovely"), ("phone", "broken")]
]
GREEDY = {"temperature": 0.0, "cache": False}


@pytest.fixture(scope="module")
def pair(model_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Reproducible engines on the same weights: jump-forward on, and off."""
    with Engine.load(model_path, parallel=4, ctx=256, reproducible=True) as on:
        with on.spawn(parallel=4, jump_forward=False) as off:
            yield on, off


def test_greedy_output_is_the_same_with_jump_forward_on_and_off(pair: tuple[Engine, Engine]) -> None:
    """In reproducible mode, on this model and these prompts, the very same tokens.

    Not a law: a forced run is decoded as one chunk (other kernels than one row
    at a time), and forced bytes are tokenized canonically where the model,
    sampling them one by one, might have split them otherwise. Either could
    move a later near-tie; the test pins that here neither does.
    """
    on, off = pair
    fast = on.generate(PROMPTS, json_schema=SCHEMA, max_tokens=64, **GREEDY)
    slow = off.generate(PROMPTS, json_schema=SCHEMA, max_tokens=64, **GREEDY)
    for a, b in zip(fast, slow):
        assert a.finish_reason == b.finish_reason == "stop", (a.text, b.text)
        assert a.token_ids == b.token_ids and a.text == b.text
        assert a.parsed == json.loads(a.text)
        assert a.forced_tokens > a.completion_tokens // 3 and b.forced_tokens == 0
    # and the promise of reproducible mode holds with forced runs in the batch
    alone = on.generate(PROMPTS[1:2], json_schema=SCHEMA, max_tokens=64, **GREEDY)[0]
    assert alone.token_ids == fast[1].token_ids
    times = on.step_times()
    assert times["forced"] > 0 and times["steps"] > 0


def test_forced_tokens_are_marked_and_keep_the_model_s_logprobs(pair: tuple[Engine, Engine]) -> None:
    on, off = pair
    a = on.generate(PROMPTS[:2], json_schema=SCHEMA, max_tokens=64, logprobs=2, **GREEDY)
    b = off.generate(PROMPTS[:2], json_schema=SCHEMA, max_tokens=64, logprobs=2, **GREEDY)
    for fast, slow in zip(a, b):
        assert fast.logprobs is not None and slow.logprobs is not None
        assert len(fast.logprobs) == fast.completion_tokens
        marked = [e for e in fast.logprobs if e.get("forced")]
        assert len(marked) == fast.forced_tokens > 0
        assert not any(e.get("forced") for e in slow.logprobs)
        assert [e["token"] for e in marked[:4]] == ['{"', "sentiment", '":', ' "']
        for x, y in zip(fast.logprobs, slow.logprobs):  # read from the forced token's own row
            assert x["id"] == y["id"] and x["logprob"] == pytest.approx(y["logprob"], abs=0.05)
            assert len(x["top_logprobs"]) == 2


def test_max_tokens_counts_forced_tokens(idle_engine: Engine) -> None:
    r = idle_engine.generate(PROMPTS[:1], json_schema=SCHEMA, max_tokens=3, **GREEDY)[0]
    assert r.finish_reason == "length" and r.completion_tokens == r.forced_tokens == 3
    assert r.text == '{"sentiment":' and r.parsed is None


def test_a_stop_string_cuts_a_forced_run(idle_engine: Engine) -> None:
    r = idle_engine.generate(PROMPTS[:1], json_schema=SCHEMA, max_tokens=64, stop=["stars"], **GREEDY)[0]
    assert r.finish_reason == "stop" and r.text.startswith('{"sentiment": "')
    assert r.text.endswith('", "') and "stars" not in r.text  # the key was forced, its quote too
    assert 0 < r.forced_tokens < r.completion_tokens
    again = idle_engine.generate(PROMPTS[:1], json_schema=SCHEMA, max_tokens=64, **GREEDY)[0]
    assert again.parsed is not None  # the slot's cache holds what was kept, nothing past the cut


def test_forced_bytes_that_a_sampled_token_can_merge_with_are_left_to_it(idle_engine: Engine) -> None:
    """llguidance's rule: the forced prefix is tokenized canonically, minus the tokens a longer
    token could still extend. ``is `` alone tokenizes as `` is`` + `` ``, but the model writes
    `` Paris`` in one token: the space is forced as a byte, not as a token."""
    prefix = "The capital of France is "
    alone = [idle_engine.tokenize(prefix, add_special=False)[-1]]
    assert idle_engine.tokenize(" ", add_special=False) == alone  # the forced bytes, tokenized alone
    r = idle_engine.generate(
        ["Q: Name a city.\nA:"], regex=r"The capital of France is (Paris|Lyon)\.",
        max_tokens=16, logprobs=0, **GREEDY,
    )[0]  # fmt: skip
    assert r.text in (prefix + "Paris.", prefix + "Lyon.")
    assert r.logprobs is not None
    pieces = [(e["token"], bool(e.get("forced"))) for e in r.logprobs]
    assert pieces[:5] == [("The", True), (" capital", True), (" of", True), (" France", True), (" is", True)]
    assert pieces[5][0] in (" Paris", " Lyon") and not pieces[5][1]  # sampled, the forced space in it
    assert pieces[6] == (".", True)
    assert list(r.token_ids) == idle_engine.tokenize(r.text, add_special=False)


def test_a_format_that_forces_everything_needs_no_sampling(idle_engine: Engine) -> None:
    for logprobs in (None, 1):  # taken at once, or decoded for their rows
        r = idle_engine.generate(
            ["Say it:"], regex="Hello there, general Kenobi", max_tokens=16, logprobs=logprobs, **GREEDY
        )[0]
        assert r.finish_reason == "stop" and r.text == "Hello there, general Kenobi"
        assert r.forced_tokens == r.completion_tokens > 1
        assert logprobs is None or (r.logprobs and all(e.get("forced") for e in r.logprobs))


def test_jump_forward_with_sampling_still_follows_the_format(idle_engine: Engine) -> None:
    results = idle_engine.generate(
        PROMPTS, json_schema=SCHEMA, max_tokens=64, temperature=0.9, seed=3, repeat_penalty=1.1, cache=False
    )
    for r in results:
        assert r.finish_reason == "stop" and r.parsed is not None, r.text
        assert r.forced_tokens > 0


def test_a_forced_token_failure_ends_only_its_request(
    idle_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An llguidance failure while taking forced tokens (injected) fails that slot alone."""
    real = _intake.take_forced
    doomed: list[object] = []

    def failing(matcher: object, room: int) -> list[int]:
        if doomed and matcher is doomed[0]:
            raise ValueError("injected: the format refused its own forced tokens")
        return real(matcher, room)  # type: ignore[arg-type]

    monkeypatch.setattr(_intake, "take_forced", failing)
    bad = idle_engine.submit(PROMPTS[0], json_schema=SCHEMA, max_tokens=64, **GREEDY)
    doomed.append(idle_engine._requests[bad.id].matcher)
    good = idle_engine.submit(PROMPTS[1], json_schema=SCHEMA, max_tokens=64, **GREEDY)
    free = idle_engine.submit("Once upon a time", max_tokens=12, **GREEDY)
    assert bad.result(timeout=120).finish_reason == "error"
    assert "injected" in (bad.result().error or "")
    assert good.result(timeout=120).parsed is not None and free.result().finish_reason == "length"


# -- the option and the views (no model) --------------------------------------------------------


def test_the_option_is_checked_before_anything_loads() -> None:
    assert parse_nbollama("load --jump-forward off").options()["jump_forward"] is False
    with pytest.raises(UsageError, match="'maybe' is not on or off"):
        parse_nbollama("load --jump-forward maybe")
    with pytest.raises(InvalidParamsError, match="jump_forward='yes': must be True or False"):
        Engine.load(jump_forward="yes")  # type: ignore[arg-type]


def test_the_views_show_forced_tokens() -> None:
    def entry(text: str, forced: bool) -> TokenLogprob:
        e = TokenLogprob(token=text, logprob=-0.1, bytes=list(text.encode()), id=1, top_logprobs=[])
        if forced:
            e["forced"] = True
        return e

    view = token_view_html([entry('{"', True), entry("a", False)])
    assert view.count("nbtv-f") == 3  # the style, the forced span, the legend's key
    assert "forced by the format" in view and "output: 2 tokens (1 forced)" in view
    assert "nbtv-f" not in token_view_html([entry("a", False)]).replace(".nbtv-f{", "")
    result = Result(
        id=1, prompt="p", text='{"a": 1}', prompt_tokens=3, completion_tokens=7, finish_reason="stop",
        error=None, ttft=0.1, tpot=0.01, queue_wait=0.0, total_time=0.2, slot=0, forced_tokens=5,
    )  # fmt: skip
    assert final_view(1, result).figures.startswith("7 tokens (5 forced) · ")
    row = LatestRow(0, "stop", 7, '{"a": 1}', None, forced=5)
    assert row.counted == "7 tok (5 forced)"
    state = ProgressState(
        total=1, sent=1, done=1, errors=0, cancelled=0, tokens=7, elapsed=1.0, running=(),
        latest=(row,), finished=True, stopped=False,
    )  # fmt: skip
    assert "#1 stop 7 tok (5 forced):" in progress_text(state)


def test_a_refused_argmax_gives_exactly_the_masked_argmax() -> None:
    """The runners-up near the peak are tried before a whole mask: the pick must not change."""
    rng = np.random.default_rng(0)
    masks = FormatMasks(1, 1000, StepTimes())
    for _ in range(300):
        row = (rng.normal(size=1000) * 3).astype(np.float32)
        row[rng.integers(0, 1000, 4)] = row.max()  # ties at the top: the lower id wins
        allowed = rng.random(1000) < rng.choice([0.002, 0.02, 0.5, 0.98])
        allowed[rng.integers(0, 1000)] = True
        mask = np.packbits(np.concatenate([allowed, np.zeros(24, bool)]), bitorder="little").view(np.int32)
        assert masks.pick_greedy(row, None, 0, mask) == masked_argmax(row, mask)  # type: ignore[arg-type]
