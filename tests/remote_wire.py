"""The log-probabilities the fake servers stream, in each server's documented wire shape.

A fake's token ``i`` (the word it streams) has log-probability
``logprob_of(i)``; its alternatives are itself, then ``" alt1"``, ``" alt2"``...
each one nat lower. Ids (llama-server gives them) are ``1000 + i`` for the
token and ``2000 + j`` for alternative ``j``. The shapes, from the projects'
code and docs:

* llama-server ``/completion`` with ``n_probs``: ``completion_probabilities``,
  one ``{id, token, bytes, logprob, top_logprobs}`` per token (``prob`` and
  ``top_probs`` with ``post_sampling_probs``); ``n_probs: 0`` gives none;
* OpenAI chat (vLLM, llama-server, OpenAI): ``choices[0].logprobs.content``,
  ``{token, logprob, bytes, top_logprobs}``; llama-server adds ``id`` and reads
  ``top_logprobs: 0`` as no probabilities at all;
* legacy completions (vLLM's ``/v1/completions`` with ``logprobs: K``):
  ``{text_offset, token_logprobs, tokens, top_logprobs: [{token: logprob}]}``,
  the sampled token and the top K in a dict (in no promised order); with
  ``echo`` the first chunk also carries the prompt's tokens, the first with
  ``null``;
* Ollama (0.12.11+) with ``logprobs: true, top_logprobs: K``: a ``logprobs`` list
  in each streamed object, ``{token, logprob, bytes, top_logprobs}``.
"""

from __future__ import annotations

import math
from typing import Any


def logprob_of(i: int) -> float:
    return -0.25 - 0.05 * i


def _alternatives(i: int, word: str, k: int) -> list[tuple[str, float, int]]:
    """The top ``k`` at position ``i``: the token itself first, then " alt1", " alt2"..."""
    value = logprob_of(i)
    if k <= 0:
        return []
    return [(word, value, 1000 + i)] + [(f" alt{j}", value - j, 2000 + j) for j in range(1, k)]


def _item(token: str, value: float, token_id: int | None, *, prob: bool = False) -> dict[str, Any]:
    item: dict[str, Any] = {"token": token, "bytes": list(token.encode())}
    if token_id is not None:
        item["id"] = token_id
    if prob:
        item["prob"] = math.exp(value)
    else:
        item["logprob"] = value
    return item


def _entry(i: int, word: str, k: int, *, ids: bool, prob: bool = False) -> dict[str, Any]:
    entry = _item(word, logprob_of(i), 1000 + i if ids else None, prob=prob)
    tops = [_item(t, v, tid if ids else None, prob=prob) for t, v, tid in _alternatives(i, word, k)]
    entry["top_probs" if prob else "top_logprobs"] = tops
    return entry


def llama_completion(body: dict[str, Any], i: int, word: str) -> dict[str, Any]:
    n = int(body.get("n_probs") or 0)
    if n <= 0:
        return {}
    post = bool(body.get("post_sampling_probs"))
    return {"completion_probabilities": [_entry(i, word, n, ids=True, prob=post)]}


def chat(kind: str, body: dict[str, Any], i: int, word: str) -> dict[str, Any]:
    if not body.get("logprobs"):
        return {}
    k = int(body.get("top_logprobs", 20 if kind == "llama-server" else 0))
    if kind == "llama-server" and k == 0:
        return {}
    return {"logprobs": {"content": [_entry(i, word, k, ids=kind == "llama-server")]}}


def ollama(body: dict[str, Any], i: int, word: str) -> dict[str, Any]:
    if not body.get("logprobs"):
        return {}
    entry = _entry(i, word, int(body.get("top_logprobs") or 0), ids=False)
    if not entry["top_logprobs"]:
        del entry["top_logprobs"]  # Go's omitempty
    return {"logprobs": [entry]}


def prompt_tokens_of(prompt: str) -> list[str]:
    """The fake's tokens of a prompt: its words, each after the first with its space."""
    words = prompt.split()
    return [w if n == 0 else f" {w}" for n, w in enumerate(words)]


def _legacy_dict(entries: list[tuple[str, float]]) -> dict[str, float]:
    return dict(reversed(entries))  # in no promised order: the reader must rank them


def legacy(body: dict[str, Any], i: int, word: str, *, echo_prompt: str | None) -> dict[str, Any]:
    """The legacy completions ``logprobs`` of token ``i`` (with the echoed prompt's before it)."""
    if body.get("logprobs") is None:
        return {}
    k = int(body["logprobs"])
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if echo_prompt is not None:
        for n, token in enumerate(prompt_tokens_of(echo_prompt)):
            tokens.append(token)
            if n == 0:
                values.append(None)
                tops.append(None)
                continue
            value = -1.0 - 0.1 * n
            values.append(value)
            tops.append(_legacy_dict([(token, value)] + [(f" p-alt{j}", value - j) for j in range(1, k)]))
    tokens.append(word)
    values.append(logprob_of(i))
    tops.append(_legacy_dict([(t, v) for t, v, _ in _alternatives(i, word, max(k, 1))]))
    return {"logprobs": {"text_offset": list(range(len(tokens))), "token_logprobs": values, "tokens": tokens, "top_logprobs": tops}}
