"""Scoring a request's choices by likelihood, from its prefill instead of by generating.

Each option is a continuation of the prompt. Its score is the summed
log-probability of its tokens after the prompt (``score="mean"`` divides by
their number), as lm-evaluation-harness and SGLang score choices. The first
token of every option is read from the last prompt position's row, which
the prefill computes anyway; only options longer than one token need more:
their other tokens go through as a short chunk on top of the prompt's KV,
which is truncated back to the prompt afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .._api.outputs import ChoiceScore

__all__ = ["ChoiceScoring", "continuation_of"]


def continuation_of(prompt_text: str, option: str) -> str:
    """The text an option stands for after the prompt: a word follows a space.

    As lm-evaluation-harness puts the space in the continuation: ``positive``
    after ``Sentiment:`` is scored as `` positive``, the way the model would
    write it there. An option that starts with whitespace, or a prompt that
    ends with it, is taken as it is.
    """
    if not prompt_text or prompt_text[-1].isspace() or option[:1].isspace():
        return option
    return " " + option


@dataclass
class ChoiceScoring:
    """One request's options, their tokens, and the log-probabilities read so far."""

    options: tuple[str, ...]
    tokens: tuple[npt.NDArray[np.int32], ...]  # each option's tokens as a continuation
    score: ChoiceScore
    prompt: npt.NDArray[np.int32]  # the request's own tokens, put back after each continuation
    logprobs: list[list[float]] = field(default_factory=list)  # per option, token by token
    pending: list[int] = field(default_factory=list)  # options whose later tokens are still to read
    current: int | None = None  # the option whose continuation is in the sequence now
    rest: list[float] = field(
        default_factory=list
    )  # the current option's later tokens, read so far
    decision: tuple[str, dict[str, float]] | None = None  # (the option, every option's probability)
    #: per option, token by token: was it the row's most likely token (None: not known, no top-1 read)
    greedy: list[list[bool | None]] = field(default_factory=list)
    rest_greedy: list[bool | None] = field(default_factory=list)  # the current option's, read so far

    def __post_init__(self) -> None:
        self.logprobs = [[] for _ in self.options]
        self.greedy = [[] for _ in self.options]

    @property
    def first_tokens(self) -> list[int]:
        return [int(t[0]) for t in self.tokens]

    def take_first(self, logprobs: list[float]) -> None:
        """The first token of every option, from the last prompt position's row: the options'
        log-probabilities, then the row's highest (an option's first token is greedy when it
        reaches it)."""
        best = logprobs[len(self.options)] if len(logprobs) > len(self.options) else None
        for i, lp in enumerate(logprobs[: len(self.options)]):
            self.logprobs[i] = [lp]
            self.greedy[i] = [None if best is None else lp >= best]
        self.pending = [i for i, t in enumerate(self.tokens) if len(t) > 1]

    def next_continuation(self) -> npt.NDArray[np.int32] | None:
        """The tokens to put after the prompt for the next long option (all but its last), or None."""
        if not self.pending:
            self.current = None
            return None
        self.current = self.pending.pop(0)
        self.rest = []
        self.rest_greedy = []
        return self.tokens[self.current][:-1]

    def take_rest(self) -> None:
        """The current option's continuation is read: its tokens after the first."""
        assert self.current is not None
        self.logprobs[self.current] = self.logprobs[self.current][:1] + self.rest
        self.greedy[self.current] = self.greedy[self.current][:1] + self.rest_greedy

    def sums(self) -> dict[str, float]:
        """Each option's summed log-probability (its log-likelihood after the prompt)."""
        return {option: math.fsum(lps) for option, lps in zip(self.options, self.logprobs)}

    def all_greedy(self) -> dict[str, bool] | None:
        """Per option: was every one of its tokens the most likely one? None where not known
        (a later token's top-1 is read only with ``logprobs`` >= 1)."""
        if any(g is None for gs in self.greedy for g in gs):
            return None
        return {option: all(bool(g) for g in gs) for option, gs in zip(self.options, self.greedy)}

    def decide(self) -> tuple[str, dict[str, float]]:
        """The most likely option and every option's probability over the options (kept in
        ``decision``)."""
        scores = [
            math.fsum(lps) / (len(lps) if self.score == "mean" else 1) for lps in self.logprobs
        ]
        peak = max(scores)
        weights = [math.exp(s - peak) for s in scores]
        total = math.fsum(weights)
        probs = {option: w / total for option, w in zip(self.options, weights)}
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        self.decision = (self.options[best], probs)
        return self.decision
