"""How a request's next token is picked from its logits row: llama.cpp's sampler chain, or an
argmax for plain greedy (the chain copies all 262k candidates per token; the argmax reads in place)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import llama_cpp as ll

from .._api.requests import SamplingParams
from ._llama import LlamaContext

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Sampler", "GreedySampler", "SamplerChain", "make_sampler"]


class Sampler(Protocol):
    """Picks a request's next token from the logits at one batch index."""

    def sample(self, context: LlamaContext, index: int) -> int: ...

    def accept(self, tokens: Sequence[int]) -> None:
        """Tokens that were not sampled (the prompt, a format's forced tokens): penalties see them."""

    def free(self) -> None: ...


class GreedySampler:
    """Greedy without llama.cpp's sampler: argmax over the logits row.

    llama.cpp's chain copies the whole vocabulary (262k entries for Gemma)
    into a candidates array for every token, about 0.25 ms each; the argmax
    reads the row in place. Ties go to the lowest token id, as in llama.cpp.
    """

    def sample(self, context: LlamaContext, index: int) -> int:
        return int(context.logits_row(index).argmax())

    def accept(self, tokens: Sequence[int]) -> None:
        pass

    def free(self) -> None:
        pass


class SamplerChain:
    """One request's sampler chain, C side: penalties, top-k, top-p, min-p, temperature, dist."""

    def __init__(self, params: SamplingParams, *, n_vocab: int) -> None:
        """``params.seed=None`` draws a fresh seed, so unseeded requests differ."""
        p = params
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little")
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = ll.llama_sampler_chain_add
        if p.repeat_penalty != 1.0:
            add(
                chain,
                ll.llama_sampler_init_penalties(
                    n_vocab, p.repeat_last_n, p.repeat_penalty, 0.0, 0.0
                ),
            )
        if p.temperature <= 0.0:
            add(chain, ll.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(chain, ll.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(chain, ll.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                add(chain, ll.llama_sampler_init_min_p(p.min_p, 1))
            add(chain, ll.llama_sampler_init_temp(p.temperature))
            add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self.ptr = chain

    def accept(self, tokens: Sequence[int] | npt.NDArray[np.int32]) -> None:
        """Let the penalty sampler see tokens it did not sample: the prompt, as llama.cpp's
        server does, and a format's forced tokens."""
        for token in tokens:
            ll.llama_sampler_accept(self.ptr, int(token))

    def sample(self, context: LlamaContext, index: int) -> int:
        return int(ll.llama_sampler_sample(self.ptr, context.ptr, index))

    def free(self) -> None:
        if self.ptr is not None:
            ll.llama_sampler_free(self.ptr)
            self.ptr = None


def make_sampler(
    params: SamplingParams, *, n_vocab: int, prompt: Sequence[int] | npt.NDArray[np.int32]
) -> Sampler:
    """The cheapest sampler that gives ``params``' tokens: plain greedy skips llama.cpp's chain."""
    if params.temperature <= 0.0 and params.repeat_penalty == 1.0:
        return GreedySampler()
    chain = SamplerChain(params, n_vocab=n_vocab)
    if params.repeat_penalty != 1.0:
        # the penalty looks back repeat_last_n tokens: older prompt tokens would fall out anyway
        chain.accept(prompt[-params.repeat_last_n :] if params.repeat_last_n > 0 else prompt)
    return chain
