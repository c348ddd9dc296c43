"""Output processing: what a request asked for beyond its text, going in and coming out.

Kept apart from the loop, as vLLM v1 keeps its output processor apart from
the engine core. Going in, a choice's options become token continuations
and a format becomes an llguidance matcher; coming out, the loop hands over
the request, how it ended and its final text, and this module lines the
log-probabilities up with that text, takes the choice and parses the format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import llguidance
import numpy as np

from .._api.outputs import Choices, Constraint, OutputRequest, TokenLogprob
from .._api.requests import FinishReason
from ..exceptions import InvalidParamsError
from ._choice import ChoiceScoring, continuation_of
from ._llama import LlamaModel
from ._slots import Request

__all__ = ["prepare_output", "take_scored", "outputs_of", "entries_within"]


def prepare_output(request: Request, text: str, output: OutputRequest, model: LlamaModel) -> None:
    """(The caller's thread, at submit.) Rows for prompt logprobs, a choice's option tokens, or
    a format's matcher.

    llguidance's tokenizer is built on the first constrained request, once
    per model. Raises ``InvalidParamsError`` when this prompt cannot run as asked.
    """
    if request.params.prompt_logprobs:
        request.prompt_entries = [None] * len(request.tokens)
        request.logits_from = 0
    if isinstance(output, Choices):
        option_tokens = tuple(
            np.asarray(
                model.tokenize(continuation_of(text, option), add_special=False), dtype=np.int32
            )
            for option in output.options
        )
        for option, ids in zip(output.options, option_tokens):
            if len(ids) == 0:
                raise InvalidParamsError(f"choices: {option!r} has no tokens")
        request.choice = ChoiceScoring(output.options, option_tokens, output.score, request.tokens)
    elif isinstance(output, Constraint):
        matcher = llguidance.LLMatcher(model.guidance_tokenizer(), output.grammar, log_level=0)
        if matcher.is_error():
            raise InvalidParamsError(f"{output.kind}: {matcher.get_error()}")
        request.constraint, request.matcher = output, matcher


def take_scored(request: Request, scored: Sequence[tuple[int, TokenLogprob]]) -> None:
    """Store a step's scored positions: the prompt's logprobs, or a choice's later tokens."""
    choice = request.choice
    if choice is not None and choice.current is not None:
        choice.rest.extend(entry["logprob"] for _, entry in scored)
        choice.rest_greedy.extend(_is_top(entry) for _, entry in scored)
        return
    if request.prompt_entries is not None:
        for pos, entry in scored:
            if pos < len(request.prompt_entries):
                request.prompt_entries[pos] = entry


def _is_top(entry: TokenLogprob) -> bool | None:
    """Whether the token was its row's most likely one; None when no alternative was read."""
    top = entry["top_logprobs"]
    return entry["logprob"] >= top[0]["logprob"] if top else None


def entries_within(entries: Sequence[TokenLogprob], text: str) -> tuple[TokenLogprob, ...]:
    """The tokens that show in ``text``: a stop string's tokens past the cut are dropped.

    A token counts when at least one of its bytes is in the text, so a
    character split across tokens keeps all of them.
    """
    limit = len(text.encode("utf-8"))
    kept: list[TokenLogprob] = []
    offset = 0
    for entry in entries:
        if offset >= limit:
            break
        kept.append(entry)
        offset += len(entry["bytes"])
    return tuple(kept)


def outputs_of(request: Request, reason: FinishReason, text: str) -> dict[str, Any]:
    """The ``Result`` fields of what ``request`` asked beyond text."""
    out: dict[str, Any] = {}
    if request.params.logprobs is not None:
        out["logprobs"] = entries_within(request.entries, text)
    if request.prompt_entries is not None:
        out["prompt_logprobs"] = tuple(request.prompt_entries)
    choice = request.choice
    if choice is not None and choice.decision is not None:
        out["choice"], out["choice_probs"] = choice.decision
        out["choice_logprobs"], out["choice_greedy"] = choice.sums(), choice.all_greedy()
    constraint = request.constraint
    if constraint is not None:
        if reason == "stop":
            out["parsed"], out["parse_error"] = constraint.parse(text)
        elif reason == "length":
            out["parse_error"] = (
                f"cut short by max_tokens={request.params.max_tokens} before the "
                f"{constraint.kind.replace('_', ' ')} was complete; raise max_tokens"
            )
        else:
            out["parse_error"] = f"the request ended with {reason!r} before its output was complete"
    return out
