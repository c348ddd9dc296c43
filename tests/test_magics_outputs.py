"""``%%generate`` beyond text: ``--logprobs``, ``--choices`` and formats, parsed, run and rendered."""

from __future__ import annotations

from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from magic_displays import cards
from magic_displays import payload as _payload

from nbollama import Engine, Result, session
from nbollama.magics._parse_generate import (
    GenerateCall,
    parse_generate,
)
from nbollama.results import Results

# -- beyond text: logprobs, choices, formats ------------------------------------------------------


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}},
    "required": ["name"],
    "additionalProperties": False,
}


def test_parse_generate_output_options() -> None:
    from nbollama._api.outputs import Choices, Constraint

    pd = pytest.importorskip("pandas")
    ns: dict[str, Any] = {"labels": pd.Series(["yes", "no"]), "schema": SCHEMA, "g": 'start: "a"'}
    call = parse_generate("--choices positive,negative --logprobs 3 --prompt-logprobs", "hi", ns)
    assert isinstance(call, GenerateCall)
    assert call.params["choices"] == ("positive", "negative") and call.params["logprobs"] == 3
    assert call.sampling.logprobs == 3 and call.sampling.prompt_logprobs
    assert call.output == Choices(("positive", "negative"), "sum")
    call = parse_generate("--choices ' yes , no' --choice-score mean", "hi", ns)
    assert call.output == Choices(("yes", "no"), "mean")  # the engine adds the space itself
    call = parse_generate("--choices labels", "hi", ns)
    assert call.params["choices"] == ("yes", "no")
    for line, kind in (("--json-schema schema", "json_schema"), ("--regex '[0-9]+'", "regex")):
        call = parse_generate(line, "hi", ns)
        assert isinstance(call.output, Constraint) and call.output.kind == kind
    call = parse_generate("--grammar g", "hi", ns)
    assert call.params["grammar"] == 'start: "a"' and call.output is not None
    assert parse_generate("--max-tokens 4", "hi", ns).output is None  # type: ignore[union-attr]


def test_a_regex_is_taken_as_typed_while_the_rest_of_the_line_is_expanded() -> None:
    def expand(line: str) -> str:  # what IPython's formatter makes of {n} and {3}
        return line.replace("{n}", "5").replace("{3}", "3")

    call = parse_generate("--regex '[0-9]{3}' --max-tokens {n}", "hi", {}, expand_options=expand)
    assert call.params["regex"] == "[0-9]{3}" and call.params["max_tokens"] == 5  # type: ignore[union-attr]
    call = parse_generate("--regex=a{3}", "hi", {}, expand_options=expand)
    assert call.params["regex"] == "a{3}"  # type: ignore[union-attr]


def test_parse_generate_takes_a_pydantic_model_class() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        name: str

    call = parse_generate("--json-schema Person", "hi", {"Person": Person})
    assert call.params["json_schema"] is Person and call.output.model is Person  # type: ignore[union-attr]


OUTPUT_ERRORS = [
    ("--choices positive", r"--choices positive: give the options as A,B .*no variable 'positive'"),
    ("--choices a,a", r"choices: 'a' is given twice"),
    ("--choices a,", r"choices: '' is not a non-empty string"),
    ("--choices word", r"--choices 'abc': give a list of strings"),
    ("--choice-score mean", r"--choice-score needs --choices"),  # the options typed, not the keywords
    ("--choices a,b --choice-score max", r"argument --choice-score: invalid choice: 'max'"),
    ("--logprobs 21", r"--logprobs 21: must be a whole number from 0 to 20"),
    ("--logprobs x", r"argument --logprobs: invalid int value: 'x'"),
    ("--json-schema nowhere", r"--json-schema nowhere: there is no variable 'nowhere'"),
    ("--json-schema number", r"--json-schema 3: give a JSON schema as a dict"),
    ("--regex '['", r"regex: .*unclosed character class"),
    ("--grammar number", r"--grammar 3: must be a non-empty string"),
    ("--choices a,b --regex x", r"choices and regex cannot be combined"),
]


@pytest.mark.parametrize(("line", "message"), OUTPUT_ERRORS)
def test_bad_output_options_with_no_engine_load_nothing(
    shell: InteractiveShell, no_engine: None, line: str, message: str
) -> None:
    shell.user_ns.update(word="abc", number=3)
    with pytest.raises(UsageError, match=message):
        shell.run_cell_magic("generate", line, "a\n---\nb")
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("generate", f"{line} hello")
    assert session.current_engine() is None, "a bad option must not load the bundled model"


def _hand_result(i: int, **fields: Any) -> Result:
    base: dict[str, Any] = dict(
        id=i, prompt=f"p{i}", text="", prompt_tokens=2, completion_tokens=1,
        finish_reason="stop", error=None, ttft=0.01, tpot=None, queue_wait=0.0,
        total_time=0.02, slot=0,
    )  # fmt: skip
    return Result(**{**base, **fields})


def test_cards_show_the_choice_the_parsed_output_and_the_tokens() -> None:
    from nbollama.magics._render import big_final_bundle, final_bundle

    token = {
        "token": " blue",
        "logprob": -0.2,
        "bytes": list(b" blue"),
        "id": 7,
        "top_logprobs": [],
    }
    results = [
        _hand_result(0, text=" positive", choice="positive",
                     choice_probs={"positive": 0.875, "negative": 0.125}),
        _hand_result(1, text='{"name": "Ada"}', parsed={"name": "Ada"}),
        _hand_result(2, text='{"na', parse_error="not valid JSON: cut short", finish_reason="length"),
        _hand_result(3, text=" blue", logprobs=(token,)),
    ]  # fmt: skip
    bundle = final_bundle(results, markdown=False)
    first, second, third, fourth = cards(bundle["text/html"])
    assert "nbollama-choice" in first and "87.5%" in first and "12.5%" in first
    assert first.index("positive") < first.index("negative") and first.count("✓") == 1
    assert "nbollama-text" not in first  # the bars say it; no second copy of the option
    assert "parsed (dict)" in second and "&quot;Ada&quot;" in second
    assert "not parsed: not valid JSON: cut short" in third
    assert "nbollama-tokenview" in fourth and "perplexity 1.22" in fourth
    assert "choice: positive (87.5%); negative 12.5%" in bundle["text/plain"]
    assert 'parsed: {"name": "Ada"}' in bundle["text/plain"]
    markdown = final_bundle(results, markdown=True)["text/markdown"]
    assert r"choice: positive \(87\.5%\); negative 12\.5%" in markdown  # escaped, as every line
    from nbollama._api.progress import ProgressState

    state = ProgressState(
        total=4, sent=4, done=4, errors=0, cancelled=0, tokens=4, elapsed=1.0,
        running=(), latest=(), finished=True, stopped=False,
    )  # fmt: skip
    big = big_final_bundle(state, Results(results), out="rows", table=False)
    assert "<code>rows[i].show()</code> shows row i's tokens" in big["text/html"]
    plain = big_final_bundle(state, Results(results[:3]), out=None, table=False)
    assert ".show()" not in plain["text/html"]


def test_output_options_reach_the_engine_and_show_in_the_cards(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    shell.user_ns.update(SCHEMA=SCHEMA, OPTIONS=["yes", "no"])
    body = (
        "Review: I loved every minute.\nSentiment:\n---\nReview: Dull and far too long.\nSentiment:"
    )
    labels = shell.run_cell_magic("generate", "--choices positive,negative --out labels", body)
    assert [r.choice for r in labels] == ["positive", "negative"], labels
    assert all(abs(sum((r.choice_probs or {}).values()) - 1) < 1e-6 for r in labels)
    assert shown[-1]["data"]["text/html"].count('class="nbollama-choice"') == 2
    assert list(labels.to_pandas().columns[-3:]) == ["choice", "p_positive", "p_negative"]
    asked = shell.run_cell_magic("generate", "--choices OPTIONS --choice-score mean", "Is 2 > 1?")
    assert asked[0].choice in ("yes", "no")

    records = shell.run_cell_magic(
        "generate", "--json-schema SCHEMA --max-tokens 24 --temperature 0", "A person as JSON:"
    )
    assert records[0].parse_error is None and set(records[0].parsed) == {"name"}, records[0]
    assert "parsed (dict)" in shown[-1]["data"]["text/html"]

    viewed = shell.run_cell_magic(
        "generate", "--logprobs 3 --prompt-logprobs --max-tokens 6 --temperature 0", "The sky is"
    )
    r = viewed[0]
    assert r.logprobs and all(len(t["top_logprobs"]) == 3 for t in r.logprobs)
    assert r.prompt_logprobs and r.prompt_logprobs[0] is None
    final = shown[-1]["data"]["text/html"]
    assert "nbollama-tokenview" in final and "prompt perplexity" in final
    assert {"mean_logprob", "perplexity", "prompt_perplexity"} <= set(viewed.to_pandas().columns)


def test_a_big_cell_with_logprobs_keeps_its_bounded_view(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    prompts = "\n".join(f"Line {i}: the sea is" for i in range(24))
    rows = shell.run_cell_magic(
        "generate", "--lines --logprobs 5 --max-tokens 2 --temperature 0 --out rows", prompts
    )
    assert rows.ok and all(r.logprobs and len(r.logprobs) == 2 for r in rows)
    assert all("nbollama-tokenview" not in o["data"]["text/html"] for o in shown)
    assert all(_payload(o) < 50_000 for o in shown) and len(rows._repr_html_()) < 20_000
    assert "<code>rows[i].show()</code> shows row i's tokens" in shown[-1]["data"]["text/html"]
