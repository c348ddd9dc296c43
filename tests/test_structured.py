"""Choices scored by likelihood and formats enforced by llguidance, on the real bundled model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pydantic
import pytest

from nbollama import Engine, InvalidParamsError
from nbollama._core._choice import continuation_of

REVIEWS = [
    "I loved every minute of it, a wonderful film.",
    "Terrible acting and a boring, far too long plot.",
    "The best meal I have had in years, lovely staff.",
    "Broken on arrival and the support never answered.",
    "A delight from start to finish.",
    "Waste of money. Awful.",
]


def classify(review: str) -> str:
    return f"Review: {review}\nSentiment (positive or negative):"


def test_the_leading_space_rule() -> None:
    assert continuation_of("Sentiment:", "positive") == " positive"
    assert continuation_of("Sentiment: ", "positive") == "positive"
    assert continuation_of("Answer:\n", "yes") == "yes"
    assert continuation_of("Sentiment:", " positive") == " positive"


def test_a_choice_is_the_word_as_the_model_writes_it_after_the_prompt(idle_engine: Engine) -> None:
    prompt = "The capital of France is"
    greedy = idle_engine.generate([prompt], max_tokens=1, temperature=0.0, logprobs=1)[0]
    word = greedy.text.strip()
    assert greedy.logprobs and greedy.text == " " + word  # the model writes the space itself
    r = idle_engine.generate([prompt], choices=[word, "Berlin"])[0]
    assert r.choice == word and r.text == word and r.ok
    # the option's first-token probability is the greedy token's own
    p_word = r.choice_probs[word]
    assert p_word > 0.5
    scored_alone = math.exp(greedy.logprobs[0]["logprob"])
    assert p_word >= scored_alone  # renormalised over the two options


def test_every_answer_is_a_label_with_probabilities(idle_engine: Engine) -> None:
    results = idle_engine.generate([classify(r) for r in REVIEWS], choices=["positive", "negative"])
    assert all(r.ok and r.choice in ("positive", "negative") for r in results)
    for r in results:
        assert set(r.choice_probs) == {"positive", "negative"}
        assert sum(r.choice_probs.values()) == pytest.approx(1.0)
        assert r.choice == max(r.choice_probs, key=r.choice_probs.__getitem__)
        assert r.completion_tokens == 0  # scored from the prefill, nothing generated
    assert [r.choice for r in results].count("positive") >= 2  # the model can tell some apart
    assert results[0].choice_probs["positive"] > results[1].choice_probs["positive"]


def test_options_of_several_tokens_are_scored_on_all_their_tokens(idle_engine: Engine) -> None:
    prompt = "Q: Which city is the capital of France?\nA:"
    options = ["Paris", "the city of Lyon on the Rhone", "Berlin, in Germany"]
    summed = idle_engine.generate([prompt], choices=options)[0]
    mean = idle_engine.generate([prompt], choices=options, choice_score="mean")[0]
    assert summed.choice == "Paris"
    assert set(mean.choice_probs) == set(options)
    # the mean forgives length: a long option loses less under it than under the sum
    assert mean.choice_probs[options[1]] > summed.choice_probs[options[1]]
    # and the slot is free and its cache holds the prompt, not an option
    again = idle_engine.generate([prompt], max_tokens=2, temperature=0.0)[0]
    assert again.ok


def test_choices_that_share_a_first_token_are_told_apart(idle_engine: Engine) -> None:
    prompt = "Counting: one, two, three, four,"
    r = idle_engine.generate([prompt], choices=["five, six", "five, nine"])[0]
    assert r.choice == "five, six" and r.choice_probs["five, six"] > 0.6


def test_bad_choices_fail_before_anything_runs(idle_engine: Engine) -> None:
    before = idle_engine.snapshot()["totals"]["submitted"]
    cases = [
        ({"choices": ["a", "a"]}, "twice"),
        ({"choices": ["a", ""]}, "non-empty"),
        ({"choices": "positive"}, "list"),
        ({"choices": ["only"]}, "two"),
        ({"choices": ["a", "b"], "json_schema": {"type": "object"}}, "cannot be combined"),
        ({"choices": ["a", "b"], "choice_score": "max"}, "choice_score"),
        ({"regex": "(unclosed"}, "regex"),
        ({"json_schema": {"type": "nonsense"}}, "json_schema"),
        ({"json_schema": 42}, "JSON schema"),
        ({"grammar": 'root ::= ("a"'}, "grammar"),
        ({"choice_score": "sum"}, "needs choices"),
    ]
    for params, words in cases:
        with pytest.raises(InvalidParamsError, match=re.escape(words)) as caught:
            idle_engine.generate(["x"], **params)
        assert "\n" not in str(caught.value)  # one line
    assert idle_engine.snapshot()["totals"]["submitted"] == before


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=20)
    country: str = pydantic.Field(max_length=20)
    founded: int = pydantic.Field(ge=1, le=2030)


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


def test_json_schema_outputs_parse_and_follow_the_schema(idle_engine: Engine) -> None:
    prompts = [f"{classify(r)}\nJSON:" for r in REVIEWS[:4]]
    results = idle_engine.generate(prompts, json_schema=SCHEMA, max_tokens=64, temperature=0.0)
    for r in results:
        assert r.finish_reason == "stop", (r.text, r.parse_error)
        assert r.parse_error is None and r.parsed == json.loads(r.text)
        assert set(r.parsed) == {"sentiment", "stars", "tags"}
        assert r.parsed["sentiment"] in ("positive", "negative") and 1 <= r.parsed["stars"] <= 5
        assert len(r.parsed["tags"]) <= 3


def test_a_pydantic_model_gives_instances_also_when_sampling(idle_engine: Engine) -> None:
    results = idle_engine.generate(
        ["A city as JSON:", "Describe Paris as JSON:"],
        response_format=City,
        max_tokens=60,
        temperature=0.8,
        seed=1,
    )
    for r in results:
        assert r.finish_reason == "stop", (r.text, r.parse_error)
        assert isinstance(r.parsed, City)


def test_a_format_cut_short_by_max_tokens_says_so(idle_engine: Engine) -> None:
    r = idle_engine.generate(["A city as JSON:"], response_format=City, max_tokens=4, temperature=0.0)[0]
    assert r.finish_reason == "length" and r.parsed is None
    assert r.parse_error is not None and "max_tokens=4" in r.parse_error


def test_regex_and_grammar(idle_engine: Engine) -> None:
    phone, date = idle_engine.generate(
        ["Call me at", "The meeting is on"], regex=r"\d{3}-\d{4}", max_tokens=12, temperature=0.9, seed=2
    )
    assert re.fullmatch(r"\d{3}-\d{4}", phone.text) and phone.parsed == phone.text
    assert re.fullmatch(r"\d{3}-\d{4}", date.text)
    gbnf = 'root ::= "yes" | "no" | "maybe"'
    r = idle_engine.generate(["Is the sky blue? Answer:"], grammar=gbnf, max_tokens=5, temperature=0.0)[0]
    assert r.text in ("yes", "no", "maybe") and r.finish_reason == "stop"


def test_constrained_and_free_requests_share_a_step(idle_engine: Engine) -> None:
    free = [idle_engine.submit(f"Story {i}:", max_tokens=16, temperature=0.0) for i in range(2)]
    bound = [
        idle_engine.submit(f"{classify(r)}\nJSON:", json_schema=SCHEMA, max_tokens=64, temperature=0.0)
        for r in REVIEWS[:2]
    ]
    assert all(h.result(timeout=120).ok for h in free + bound)
    assert all(h.result().parsed is not None for h in bound)
    assert all(h.result().parsed is None for h in free)


def test_choices_in_reproducible_mode_do_not_depend_on_the_batch(model_path: Path) -> None:
    prompts = [classify(r) for r in REVIEWS]
    with Engine.load(model_path, parallel=4, ctx=256, reproducible=True) as engine:
        # cache=False: the engine's numbers are measured (the store would replay `together`'s)
        together = engine.generate(prompts, choices=["positive", "negative"], cache=False)
        alone = [engine.generate([p], choices=["positive", "negative"], cache=False)[0] for p in prompts[:2]]
    assert [r.choice_probs for r in together[:2]] == [r.choice_probs for r in alone]
