"""lm-evaluation-harness's requests as engine requests, and their results read back.

Pure functions over strings and ``Result`` objects (no engine, no lm-eval
task machinery), so the mapping is tested on its own:

* ``loglikelihood``: requests that share a context become ONE ``choices``
  request (one prefill of the context, each continuation scored on top of
  it), read back from ``choice_logprobs``/``choice_greedy``. A context with a
  single continuation, or one the choices path would change, is scored from
  ``prompt_logprobs`` of context + continuation instead, by byte offsets;
* ``loglikelihood_rolling``: ``prompt_logprobs`` of the text, cut into
  lm-eval's rolling windows (``lm_eval.utils.get_rolling_token_windows``)
  when it is longer than a slot holds;
* ``generate_until``: a greedy (or sampled) generation with lm-eval's stop
  strings and token budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._api.outputs import TokenLogprob
from ._api.requests import Result
from .exceptions import InvalidParamsError

__all__ = [
    "Ask",
    "ScoreRead",
    "SCORE_PARAMS",
    "CHOICE_PARAMS",
    "split_context",
    "plan_loglikelihood",
    "read_loglikelihood",
    "continuation_score",
    "Window",
    "rolling_windows",
    "read_rolling",
    "generation_params",
]

#: What scoring a prompt needs: its tokens' log-probabilities with the top one (is it greedy?)
SCORE_PARAMS: dict[str, Any] = {
    "prompt_logprobs": True,
    "logprobs": 1,
    "max_tokens": 1,
    "temperature": 0.0,
}
#: What scoring continuations as options needs; ``choices`` is added per request
CHOICE_PARAMS: dict[str, Any] = {"logprobs": 1, "max_tokens": 1, "temperature": 0.0}


@dataclass(frozen=True)
class Ask:
    """One engine request of an evaluation: its prompt, its ``submit`` parameters, its task."""

    prompt: str
    params: Mapping[str, Any]
    task: str = ""


@dataclass(frozen=True)
class ScoreRead:
    """Where one lm-eval request's answer is in the results: ask ``ask``'s option ``option``
    (choices path) or the bytes of its prompt from ``start`` on (prompt path)."""

    ask: int
    option: str | None = None
    start: int = 0


def split_context(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context moves to the continuation, as lm-eval's own models do
    (``Answer: `` + ``Paris`` is scored as ``Answer:`` + `` Paris``)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped) :] + continuation


def _choice_safe(context: str, options: Sequence[str]) -> bool:
    """Whether the choices path scores each option exactly as given: it puts a space before a
    word after a context that ends in none, so every option must bring its own, and each must
    be something more than whitespace (two at least, all different)."""
    if len(options) < 2:
        return False
    for option in options:
        if not option.strip():
            return False
        if context and not option[:1].isspace():
            return False
    return True


def plan_loglikelihood(
    pairs: Sequence[tuple[str, str]], tasks: Sequence[str], *, choices: bool
) -> tuple[list[Ask], list[ScoreRead]]:
    """The engine requests for lm-eval's ``(context, continuation)`` pairs, and where each pair's
    answer will be. ``choices``: the engine scores options (an in-kernel engine does)."""
    groups: dict[str, dict[str, None]] = {}
    split = [split_context(c, x) for c, x in pairs]
    for context, continuation in split:
        groups.setdefault(context, {})[continuation] = None
    asks: list[Ask] = []
    where: dict[tuple[str, str], ScoreRead] = {}
    task_of = {s: t for s, t in zip(split, tasks)}
    for context, conts in groups.items():
        options = list(conts)
        if choices and _choice_safe(context, options):
            params = {**CHOICE_PARAMS, "choices": options}
            asks.append(Ask(context, params, task_of[(context, options[0])]))
            for option in options:
                where[(context, option)] = ScoreRead(len(asks) - 1, option=option)
            continue
        for option in options:
            asks.append(Ask(context + option, SCORE_PARAMS, task_of[(context, option)]))
            where[(context, option)] = ScoreRead(len(asks) - 1, start=len(context.encode("utf-8")))
    return asks, [where[s] for s in split]


def _offsets(
    entries: Sequence[TokenLogprob | None], text: str
) -> list[tuple[int, int, TokenLogprob]]:
    """Each scored prompt token with its byte span in ``text``. The first token has no entry
    (nothing before it); whatever it covered (a BOS: nothing) is what the others leave over."""
    scored = [e for e in entries if e is not None]
    at = len(text.encode("utf-8")) - sum(len(e["bytes"]) for e in scored)
    spans = []
    for entry in scored:
        end = at + len(entry["bytes"])
        spans.append((at, end, entry))
        at = end
    return spans


def _is_greedy(entry: TokenLogprob) -> bool:
    top = entry["top_logprobs"]
    return bool(top) and entry["logprob"] >= top[0]["logprob"]


def continuation_score(result: Result, start: int) -> tuple[float, bool]:
    """Summed log-probability of the prompt's bytes from ``start`` on (every token that holds
    one of them), and whether each of those tokens was the most likely one."""
    entries = result.prompt_logprobs
    if entries is None:
        raise InvalidParamsError("the engine returned no prompt log-probabilities")
    picked = [e for s, end, e in _offsets(entries, result.prompt) if end > start]
    return math.fsum(e["logprob"] for e in picked), all(_is_greedy(e) for e in picked)


def read_loglikelihood(
    reads: Sequence[ScoreRead], results: Sequence[Result]
) -> list[tuple[float, bool]]:
    """lm-eval's ``(logprob, is_greedy)`` per pair, from the results of ``plan_loglikelihood``'s asks."""
    out = []
    for read in reads:
        result = results[read.ask]
        if read.option is None:
            out.append(continuation_score(result, read.start))
            continue
        sums, greedy = result.choice_logprobs, result.choice_greedy
        if sums is None:
            raise InvalidParamsError("the engine returned no per-option log-likelihoods")
        out.append((float(sums[read.option]), bool(greedy and greedy[read.option])))
    return out


# -- rolling windows -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One prompt of a rolling score: the text from ``context`` to ``end`` (characters), whose
    bytes from ``score_from`` on are scored (the bytes before are context)."""

    text: str
    score_from: int


@dataclass
class _Words:
    """A text cut before each run of whitespace, with each piece's tokens: cuts where every
    tokenizer keeps a token boundary, so the pieces' tokens are the text's."""

    starts: list[int] = field(default_factory=list)  # character offset of each piece
    first: list[int] = field(default_factory=list)  # index of each piece's first token
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def flat(self) -> list[int]:
        return [t for piece in self.tokens for t in piece]


def _words(text: str, tokenize: Callable[[str], list[int]]) -> _Words:
    cuts = [0] + [i for i in range(1, len(text)) if text[i].isspace() and not text[i - 1].isspace()]
    words = _Words()
    count = 0
    for start, end in zip(cuts, cuts[1:] + [len(text)]):
        piece = tokenize(text[start:end])
        words.starts.append(start)
        words.first.append(count)
        words.tokens.append(piece)
        count += len(piece)
    return words


def _char_offset(text: str, words: _Words, k: int, tokenize: Callable[[str], list[int]]) -> int:
    """Where token ``k`` starts in ``text``: inside a word, the first prefix of the word that
    tokenizes to the word's first tokens; if none does, the word's start."""
    if k >= sum(len(t) for t in words.tokens):
        return len(text)
    j = max(i for i, first in enumerate(words.first) if first <= k and words.tokens[i])
    r = k - words.first[j]
    if r == 0:
        return words.starts[j]
    start = words.starts[j]
    end = words.starts[j + 1] if j + 1 < len(words.starts) else len(text)
    for m in range(start + 1, end):
        if tokenize(text[start:m]) == words.tokens[j][:r]:
            return m
    return start


def rolling_windows(
    text: str,
    tokenize: Callable[[str], list[int]] | None,
    max_tokens: int | None,
    windows_of: Callable[..., Any],
) -> list[Window]:
    """The prompts that score every token of ``text`` once: the whole text when it fits (or
    when there is no tokenizer to cut it), else lm-eval's rolling windows of ``max_tokens``
    (``windows_of``: ``get_rolling_token_windows``, made disjoint), each cut at its tokens'
    characters. Every prompt gets the model's BOS in front, as every prompt here does."""
    if not text:
        return []
    if tokenize is None or max_tokens is None:
        return [Window(text, 0)]
    if len(tokenize(text)) <= max_tokens:
        return [Window(text, 0)]
    words = _words(text, tokenize)
    n = sum(len(t) for t in words.tokens)
    out: list[Window] = []
    offset: dict[int, int] = {}

    def at(k: int) -> int:
        if k not in offset:
            offset[k] = _char_offset(text, words, k, tokenize)
        return offset[k]

    # windows over token indices: each window's context and predicted tokens, as positions
    for context, predicted in windows_of(list(range(n)), -1, max_tokens):
        first = next((i for i in context if i >= 0), predicted[0])
        begin, score, end = at(first), at(predicted[0]), at(predicted[-1] + 1)
        if end > score:
            piece = text[begin:end]
            out.append(Window(piece, len(text[begin:score].encode("utf-8"))))
    return out


def read_rolling(windows: Sequence[Window], results: Sequence[Result]) -> float:
    """The text's total log-probability: each window's scored bytes, summed."""
    return math.fsum(
        continuation_score(result, window.score_from)[0] for window, result in zip(windows, results)
    )


# -- generation ------------------------------------------------------------------------------------------

#: lm-eval's generation keywords that map onto the engine's sampling parameters
_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repeat_penalty",
    "seed": "seed",
}


def generation_params(gen_kwargs: Mapping[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """``submit`` parameters from lm-eval's ``gen_kwargs``: ``until`` -> stop, ``max_gen_toks`` ->
    max_tokens, greedy unless ``do_sample``. A keyword the engine has no word for is refused."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    stop = [until] if isinstance(until, str) else [s for s in until if s]
    max_tokens = int(kwargs.pop("max_gen_toks", default_max_tokens))
    do_sample = bool(kwargs.pop("do_sample", False))
    params: dict[str, Any] = {"max_tokens": max_tokens, "stop": stop}
    for key, value in kwargs.items():
        name = _SAMPLING.get(key)
        if name is None:
            raise InvalidParamsError(
                f"generation keyword {key}={value!r}: nbollama's engines take "
                f"until, max_gen_toks, do_sample and {', '.join(sorted(_SAMPLING))}"
            )
        if value is not None:
            params[name] = value
    if not do_sample:
        params["temperature"] = 0.0
        params.pop("seed", None)
    else:
        params.setdefault("temperature", 1.0)
    return params
