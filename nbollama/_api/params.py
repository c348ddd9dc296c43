"""A request's parameters, checked before anything runs: how it is sampled, when it stops, what else it asks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..exceptions import InvalidParamsError
from .outputs import MAX_LOGPROBS, OUTPUT_FIELDS, check_output_options

__all__ = ["SamplingParams", "check_request_params"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it stops; validated once, at submit."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: alternatives per generated token (0-20): each token's log-probability with its top K; None: off
    logprobs: int | None = None
    #: the same for the prompt's tokens, from the prefill (turns prefix reuse off for the request)
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: object, rule: str) -> InvalidParamsError:
            return InvalidParamsError(f"{name}={value!r}: {rule}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be a whole number >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", self.top_k, "must be a whole number >= 0 (0 turns it off)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0.0 <= self.min_p < 1.0:
            raise bad("min_p", self.min_p, "must be in [0, 1)")
        if not math.isfinite(self.repeat_penalty) or self.repeat_penalty <= 0:
            raise bad("repeat_penalty", self.repeat_penalty, "must be > 0 (1.0 turns it off)")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", self.seed, "must be a whole number or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", self.stop, "must be non-empty strings")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int)
            or isinstance(self.logprobs, bool)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad(
                "logprobs",
                self.logprobs,
                f"must be a whole number from 0 to {MAX_LOGPROBS}, or None",
            )
        if not isinstance(self.prompt_logprobs, bool):
            raise bad("prompt_logprobs", self.prompt_logprobs, "must be True or False")



_SAMPLING_FIELDS = frozenset(f for f in SamplingParams.__dataclass_fields__ if f != "stop")
_REQUEST_FIELDS = frozenset({"priority", "chat", "system", "stop", "cache"}) | OUTPUT_FIELDS


def check_request_params(params: dict[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
    """Split and check ``submit`` keywords before anything runs: (sampling, request options).

    Raises ``InvalidParamsError`` naming a misspelt or out-of-range parameter.
    """
    unknown = set(params) - _SAMPLING_FIELDS - _REQUEST_FIELDS
    if unknown:
        raise InvalidParamsError(
            f"unknown parameter(s) {sorted(unknown)}; known: {sorted(_SAMPLING_FIELDS | _REQUEST_FIELDS)}"
        )
    stop = params.get("stop", ())
    sampling = SamplingParams(
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        **{k: v for k, v in params.items() if k in _SAMPLING_FIELDS},
    )
    options = {
        "priority": params.get("priority", 0),
        "chat": params.get("chat", False),
        "system": params.get("system"),
        "output": check_output_options(params),  # Choices, Constraint or None
        "cache": params.get("cache", "auto"),  # the result store's policy: checked by the engine
    }
    if not isinstance(options["priority"], int) or isinstance(options["priority"], bool):
        raise InvalidParamsError(f"priority={options['priority']!r}: must be a whole number")
    if options["system"] is not None and not isinstance(options["system"], str):
        raise InvalidParamsError(f"system={options['system']!r}: must be a string")
    if options["system"] and not options["chat"]:
        raise InvalidParamsError(
            "system= needs chat=True (the system message goes through the chat template)"
        )
    return sampling, options
