"""``Results`` views of what requests asked beyond text, on hand-built ``Result`` objects (no model).

``to_pandas`` gets columns only for what was asked: a choice and its
probabilities, the perplexity figures, a parsed output's fields; the columns
every table had stay as they were.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from nbollama import Result
from nbollama._api.outputs import TokenLogprob
from nbollama._api.results import _COLUMNS
from nbollama.results import Results


def result(i: int = 0, **fields: Any) -> Result:
    base: dict[str, Any] = dict(
        id=i,
        prompt=f"prompt {i}",
        text=f"text {i}",
        prompt_tokens=3,
        completion_tokens=2,
        finish_reason="stop",
        error=None,
        ttft=0.01,
        tpot=0.02,
        queue_wait=0.0,
        total_time=0.05,
        slot=0,
    )
    base.update(fields)
    return Result(**base)


def tokens(*probabilities: float) -> tuple[TokenLogprob, ...]:
    return tuple(
        {"token": "x", "logprob": math.log(p), "bytes": [120], "id": 1, "top_logprobs": []}
        for p in probabilities
    )


def test_plain_results_keep_exactly_the_old_columns() -> None:
    frame = Results([result(0), result(1)]).to_pandas()
    assert list(frame.columns) == list(_COLUMNS)


def test_choices_add_the_choice_and_one_probability_per_option() -> None:
    rows = Results(
        [
            result(0, choice="positive", choice_probs={"positive": 0.9, "negative": 0.1}),
            result(1, choice="negative", choice_probs={"positive": 0.25, "negative": 0.75}),
        ]
    )
    frame = rows.to_pandas()
    assert list(frame.columns) == [*_COLUMNS, "choice", "p_positive", "p_negative"]
    assert list(frame["choice"]) == ["positive", "negative"]
    assert list(frame["p_positive"]) == [0.9, 0.25] and list(frame["p_negative"]) == [0.1, 0.75]
    assert "positive (90%)" in rows._repr_html_() and "negative (75%)" in repr(rows)


def test_logprobs_add_mean_logprob_and_perplexity() -> None:
    first = result(0, logprobs=tokens(0.5, 0.25))
    second = result(1, logprobs=tokens(1.0), prompt_logprobs=(None, *tokens(0.5)))
    frame = Results([first, second]).to_pandas()
    assert list(frame.columns) == [*_COLUMNS, "mean_logprob", "perplexity", "prompt_perplexity"]
    mean = (math.log(0.5) + math.log(0.25)) / 2
    assert frame["mean_logprob"][0] == pytest.approx(mean)
    assert frame["perplexity"][0] == pytest.approx(math.exp(-mean))
    assert frame["perplexity"][1] == pytest.approx(1.0)
    assert frame["prompt_perplexity"].isna()[0] and frame["prompt_perplexity"][1] == pytest.approx(
        2
    )


class _Model:
    """Stands in for a pydantic instance: ``model_dump()`` gives its fields."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def model_dump(self) -> dict[str, Any]:
        return dict(self.fields)


def test_a_json_schema_expands_the_parsed_fields_and_keeps_the_parse_error() -> None:
    rows = Results(
        [
            result(0, parsed={"name": "Ada", "age": 36, "text": "hi"}),
            result(1, parsed=_Model(name="Bob", age=7, tags=["a"])),
            result(2, parse_error="not valid JSON: Expecting value", finish_reason="length"),
        ]
    )
    frame = rows.to_pandas()
    assert list(frame.columns) == [*_COLUMNS, "name", "age", "parsed_text", "tags", "parse_error"]
    assert list(frame["name"][:2]) == ["Ada", "Bob"] and frame["name"].isna()[2]
    assert frame["parsed_text"][0] == "hi" and frame["text"][0] == "text 0"  # no column replaced
    assert frame["tags"][1] == ["a"]
    assert list(frame["parse_error"].isna()) == [True, True, False]
    assert frame["parse_error"][2] == "not valid JSON: Expecting value"


def test_a_regex_adds_only_the_parse_error() -> None:
    frame = Results([result(0, parsed="text 0"), result(1, parse_error="cut short")]).to_pandas()
    assert list(frame.columns) == [*_COLUMNS, "parse_error"]


def test_the_new_columns_join_back_onto_a_frame() -> None:
    import pandas as pd

    rows = Results(
        [result(i, choice="a", choice_probs={"a": 0.6, "b": 0.4}) for i in range(2)],
        index=[10, 11],
    )
    joined = rows.to_pandas(join=pd.DataFrame({"x": [1, 2]}, index=[10, 11]))
    assert list(joined["p_a"]) == [0.6, 0.6] and list(joined["x"]) == [1, 2]


# -- one Result, as a cell's value --------------------------------------------------------------


def test_a_result_reprs_as_one_short_line() -> None:
    long = result(7, text="The capital of France is Paris, a city of light and of many bridges over the Seine.",
                  token_ids=tuple(range(40)), completion_tokens=40, finish_reason="length")
    shown = repr(long)
    assert "\n" not in shown and shown.startswith("<Result #7 length, 40 tokens: 'The capital")
    assert len(shown) < 110 and "token_ids" not in shown
    assert repr(result(1, cached=True)).startswith("<Result #1 stop, replayed, 2 tokens")


def test_a_result_shows_its_card_in_a_notebook() -> None:
    """The card a %%generate cell draws for it, with or without logprobs."""
    plain = result(3, text="Paris")._repr_html_()
    assert 'class="nbollama-card"' in plain and "Paris" in plain and ">done<" in plain
    with_tokens = result(4, logprobs=tokens(0.9, 0.5))._repr_html_()
    assert 'class="nbollama-card"' in with_tokens and "nbollama-tokenview" in with_tokens
    assert ">cached<" in result(5, cached=True)._repr_html_()
