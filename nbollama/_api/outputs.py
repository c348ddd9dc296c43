"""What a request asks for beyond its text, checked before anything runs.

* **log-probabilities** (``logprobs=K``, ``prompt_logprobs=True``), given in
  OpenAI's shape: ``token``, ``logprob``, ``bytes``, ``top_logprobs``, plus the
  token ``id``;
* **a choice** (``choices=[...]``): the option the model finds most likely
  after the prompt, scored by likelihood rather than generated;
* **a format** the output must follow (``json_schema=``/``response_format=``,
  ``regex=``, ``grammar=``), enforced by llguidance token masks.

Both engines read the same checked objects: the in-kernel engine enforces and
scores them itself, a remote engine maps them onto its server's fields.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import llguidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

from ..exceptions import InvalidParamsError

__all__ = [
    "MAX_LOGPROBS",
    "TopLogprob",
    "TokenLogprob",
    "ChoiceScore",
    "Choices",
    "Constraint",
    "OutputRequest",
    "check_output_options",
    "OUTPUT_FIELDS",
    "mean_logprob",
]

#: The most alternatives a token can show (OpenAI's and vLLM's limit).
MAX_LOGPROBS = 20

ChoiceScore = Literal["sum", "mean"]

#: JSON output as ``json.dumps`` writes it, on one line: ``{"a": 1, "b": [2, 3]}``. Fixed
#: whitespace lets a schema force every key, quote and separator (the engine then takes them
#: without sampling: jump-forward), and keeps a small model out of endless blank lines. A
#: schema's own ``"x-guidance"`` options still win (llguidance applies them after these).
JSON_STYLE: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class TopLogprob(TypedDict):
    """One alternative the model considered at a position."""

    token: str
    logprob: float
    bytes: list[int]
    id: int


class _TokenLogprobFields(TypedDict):
    token: str
    logprob: float
    bytes: list[int]
    id: int
    top_logprobs: list[TopLogprob]


class TokenLogprob(_TokenLogprobFields, total=False):
    """One token as the model computed it (before temperature, penalties and masks).

    ``forced``: True where the format allowed only this token and the engine
    took it without sampling (jump-forward); absent otherwise.
    """

    forced: bool


@dataclass(frozen=True)
class Choices:
    """Pick one of ``options`` by likelihood; ``score="mean"`` divides by the option's tokens."""

    options: tuple[str, ...]
    score: ChoiceScore = "sum"


@dataclass(frozen=True)
class Constraint:
    """A format the output must follow; ``grammar`` is llguidance's, already validated."""

    kind: Literal["json_schema", "regex", "grammar"]
    source: str  # the schema as JSON text, the regex, or the grammar as given
    grammar: str
    schema: dict[str, Any] | None = None  # json_schema: the schema itself (remote engines send it)
    model: type | None = None  # a pydantic model class: Result.parsed is an instance of it

    def parse(self, text: str) -> tuple[Any, str | None]:
        """(parsed, None) for output that follows the format, else (None, why not)."""
        if self.kind != "json_schema":
            return text, None
        if self.model is not None:
            try:
                return self.model.model_validate_json(text), None  # type: ignore[attr-defined]
            except Exception as exc:
                return None, f"{type(exc).__name__}: {_first_line(exc)}"
        try:
            return json.loads(text), None
        except ValueError as exc:
            return None, f"not valid JSON: {exc}"


OutputRequest = Choices | Constraint | None

#: The keywords ``check_output_options`` takes out of a ``submit`` call.
OUTPUT_FIELDS = frozenset(
    {"choices", "choice_score", "json_schema", "response_format", "regex", "grammar"}
)


def _first_line(exc: BaseException) -> str:
    """A library's message folded onto one line (llguidance's and pydantic's span several)."""
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


def _check_grammar(kind: str, grammar: str) -> None:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidParamsError(f"{kind}: {_first_line(ValueError(error))}")


def _schema_of(value: object, name: str) -> tuple[dict[str, Any], type | None]:
    """A JSON schema from a dict, JSON text, or a pydantic model class."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        return value.model_json_schema(), value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidParamsError(f"{name}: not valid JSON ({exc})") from None
    if isinstance(value, dict) and value.get("type") == "json_schema" and "json_schema" in value:
        inner = value["json_schema"]  # OpenAI's response_format={"type": "json_schema", ...}
        value = inner.get("schema", inner) if isinstance(inner, dict) else inner
    if not isinstance(value, dict):
        raise InvalidParamsError(
            f"{name}={value!r}: give a JSON schema as a dict, JSON text, or a pydantic model class"
        )
    return value, None


def _choices_of(value: object, score: object) -> Choices:
    if isinstance(value, str):
        raise InvalidParamsError(
            f"choices={value!r}: give a list of strings (one string is a single option)"
        )
    if not isinstance(value, Sequence) or not value:
        raise InvalidParamsError(f"choices={value!r}: give a non-empty list of strings")
    options = tuple(value)
    if len(options) < 2:
        raise InvalidParamsError(f"choices={list(options)!r}: give at least two options")
    for option in options:
        if not isinstance(option, str) or not option.strip():
            raise InvalidParamsError(f"choices: {option!r} is not a non-empty string")
    seen: set[str] = set()
    for option in options:
        if option in seen:
            raise InvalidParamsError(f"choices: {option!r} is given twice")
        seen.add(option)
    if score not in ("sum", "mean"):
        raise InvalidParamsError(f"choice_score={score!r}: must be 'sum' or 'mean'")
    return Choices(options, score)


def check_output_options(params: dict[str, Any]) -> OutputRequest:
    """The checked choice or constraint of a ``submit`` call (None when it asks for neither).

    Raises ``InvalidParamsError`` with one line for a bad schema, regex,
    grammar or choice list, or for asking for two of them at once.
    """
    given = [
        k
        for k in ("choices", "json_schema", "response_format", "regex", "grammar")
        if params.get(k) is not None
    ]
    if len(given) > 1:
        raise InvalidParamsError(
            f"{' and '.join(given)} cannot be combined: a request takes one of choices, "
            "json_schema (response_format), regex or grammar"
        )
    if "choice_score" in params and "choices" not in given:
        raise InvalidParamsError("choice_score= needs choices=")
    if not given:
        return None
    name = given[0]
    value = params[name]
    if name == "choices":
        return _choices_of(value, params.get("choice_score", "sum"))
    if name in ("json_schema", "response_format"):
        schema, model = _schema_of(value, name)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except ValueError as exc:
            raise InvalidParamsError(f"{name}: {_first_line(exc)}") from None
        _check_grammar(name, grammar)
        return Constraint("json_schema", json.dumps(schema), grammar, schema, model)
    if not isinstance(value, str) or not value:
        raise InvalidParamsError(f"{name}={value!r}: must be a non-empty string")
    if name == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(value)
        _check_grammar("regex", grammar)
        return Constraint("regex", value, grammar)
    try:
        grammar = llguidance.grammar_from("grammar", value)  # Lark, or GBNF as llama.cpp takes
    except ValueError as exc:
        raise InvalidParamsError(f"grammar: {_first_line(exc)}") from None
    _check_grammar("grammar", grammar)
    return Constraint("grammar", value, grammar)


def mean_logprob(logprobs: Sequence[TokenLogprob] | None) -> float | None:
    """The mean log-probability of some tokens (None when there are none)."""
    if not logprobs:
        return None
    return math.fsum(t["logprob"] for t in logprobs) / len(logprobs)
