"""A request's progress inside the engine, and the slots that serve requests.

Like nano-vllm's ``sequence.py``: plain state, no policy. The scheduler
decides which slot takes which request and what each step decodes; the
runner decodes and samples; the engine moves requests through these states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from .._api.outputs import Constraint, TokenLogprob
from .._api.requests import FinishReason, Handle, SamplingParams
from .._api.snapshot import BADGE_FOR_REASON, EndedRequest, SlotSnapshot, SlotState, idle_row

if TYPE_CHECKING:
    import llguidance

    from ._choice import ChoiceScoring
    from ._sampler import Sampler
    from ._text import TextStream

_NO_TOKENS: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)

__all__ = ["Request", "SavedPrompt", "Slot", "Source"]


@dataclass(frozen=True)
class Source:
    """Copy the first ``tokens`` positions of ``slot``'s sequence: now if ``ready``, else once
    that slot has prefilled them.

    ``ready`` is decided when the request is admitted, from the source's state
    at that moment; the engine applies each admission's KV changes in order,
    so a source taken by a later request in the same round is copied from
    before it is truncated.
    """

    slot: int
    tokens: int
    ready: bool


@dataclass(frozen=True, eq=False)
class SavedPrompt:
    """A sequence kept in host RAM (see ``_prompt_cache``): its tokens (positions 0..n-1) and
    llama.cpp's bytes for their KV."""

    tokens: npt.NDArray[np.int32]
    state: bytes | bytearray

    @property
    def nbytes(self) -> int:
        return len(self.state) + self.tokens.nbytes


@dataclass(eq=False)
class Request:
    """One prompt on its way through the engine."""

    handle: Handle
    tokens: npt.NDArray[np.int32]
    params: SamplingParams
    priority: int
    preview: str
    cancel_requested: bool = False
    # set when a slot takes it (on the engine's thread)
    sampler: Sampler | None = None
    text: TextStream | None = None
    admitted_order: int = 0
    n_prefilled: int = 0  # prompt tokens in the KV cache: reused or computed
    cached_tokens: int = 0  # of those, reused from a cache or copied from another slot
    copy_from: Source | None = None  # waiting for another slot's prefix before prefilling
    # the prompt cache in host RAM (see _prompt_cache): a saved prompt to write into the slot and
    # how many of its tokens to keep; the tokens the slot held, to save before they are cut
    restore: tuple[SavedPrompt, int] | None = None
    evicts: npt.NDArray[np.int32] | None = None
    output_ids: list[int] = field(default_factory=list)  # sampled tokens, in order
    completion_tokens: int = 0
    # what the request asked beyond text (see _logits and _choice)
    entries: list[TokenLogprob] = field(default_factory=list)  # with logprobs: one per output token
    prompt_entries: list[TokenLogprob | None] | None = None  # with prompt_logprobs
    logits_from: int | None = (
        None  # prompt positions from here on get a row: their next token is scored
    )
    choice: ChoiceScoring | None = None  # choices= : scored, not generated
    constraint: Constraint | None = None
    matcher: llguidance.LLMatcher | None = None  # the constraint's state, token by token
    # jump-forward (see _jump): tokens the format forced at the very start, decoded after the
    # prompt; the entry of the first one (its row is the prompt's last); how many were taken
    start_forced: tuple[int, ...] = ()
    lead_entry: TokenLogprob | None = None
    forced_tokens: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.tokens)

    @property
    def reuses_prefix(self) -> bool:
        """Prompt logprobs need a row for every prompt token, so nothing cached can stand in."""
        return not self.params.prompt_logprobs

    @property
    def prefill_remaining(self) -> int:
        return len(self.tokens) - self.n_prefilled

    @property
    def ready_to_prefill(self) -> bool:
        return self.copy_from is None and self.prefill_remaining > 0


@dataclass(eq=False)
class Slot:
    """One sequence of the context: idle, or serving a request."""

    id: int
    state: SlotState = "idle"
    request: Request | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    last_token: int = 0  # sampled (or forced, with lead_forced), not yet decoded
    forced: tuple[int, ...] = ()  # forced by the format after last_token: decoded, then accepted
    lead_forced: bool = False
    ended: EndedRequest | None = None  # how the last request ended (its badge for a moment)
    # the prefix cache: tokens whose KV this slot's sequence keeps while it is idle
    cache: npt.NDArray[np.int32] = field(default_factory=lambda: _NO_TOKENS)
    last_used: float = 0.0

    @property
    def busy(self) -> bool:
        return self.request is not None

    def sequence_tokens(self, *, prompt_only: bool = False) -> npt.NDArray[np.int32]:
        """The tokens this slot's sequence holds or will hold once its prompt is in."""
        request = self.request
        if request is None:
            return self.cache
        if prompt_only or not request.output_ids:
            return request.tokens
        return np.concatenate([request.tokens, np.asarray(request.output_ids, dtype=np.int32)])

    def held_tokens(self) -> npt.NDArray[np.int32]:
        """The tokens whose KV the sequence holds now (positions 0..n_past-1)."""
        return self.sequence_tokens()[: self.n_past] if self.request is not None else self.cache

    def take(self, request: Request, order: int, keep: int) -> None:
        """Bind a request (under the engine's lock), reusing the first ``keep`` cached tokens."""
        request.admitted_order = order
        request.n_prefilled = request.cached_tokens = keep
        self.request = request
        self.state = "prefill"
        self.n_past = keep
        self.forced, self.lead_forced = (), False
        self.cache = _NO_TOKENS

    def release(
        self, reason: FinishReason, *, keep_cache: bool, prompt_only: bool = False
    ) -> Request | None:
        """Unbind the request (under the engine's lock) and remember how it ended.

        With ``keep_cache`` the tokens of the sequence stay as this slot's
        prefix cache (only its prompt's with ``prompt_only``); otherwise (an
        error, or no prefix cache) it is empty.
        """
        request = self.request
        if request is None:
            return None
        held = self.held_tokens()
        if prompt_only:
            held = held[: request.n_prefilled]
        self.cache = held.copy() if keep_cache else _NO_TOKENS
        self.request = None
        self.state = "idle"
        self.forced, self.lead_forced = (), False
        self.n_past = len(held) if keep_cache else 0
        self.last_used = time.monotonic()
        self.ended = EndedRequest(
            badge=BADGE_FOR_REASON[reason],
            request_id=request.handle.id,
            preview=request.preview,
            prompt_tokens=request.prompt_len,
            cached_tokens=request.cached_tokens,
            decoded=request.completion_tokens,
            max_tokens=request.params.max_tokens,
            at=self.last_used,
        )
        return request

    def forget(self) -> None:
        """Drop the prefix cache (its KV was removed or evicted)."""
        self.cache = _NO_TOKENS
        if self.request is None:
            self.n_past = 0

    def snapshot(self, now_mono: float, now_perf: float) -> SlotSnapshot:
        """What views show of this slot: its request now, or how the last one ended."""
        s = self
        r = s.request
        if r is not None:
            first = r.handle.timing.first_token
            elapsed = now_perf - first if first is not None else 0.0
            return SlotSnapshot(
                id=s.id,
                state=s.state,
                badge=s.state,
                request_id=r.handle.id,
                prompt_preview=r.preview,
                prompt_tokens=r.prompt_len,
                prefilled_tokens=r.n_prefilled,
                cached_tokens=r.cached_tokens,
                decoded_tokens=r.completion_tokens,
                max_tokens=r.params.max_tokens,
                tps=round(r.completion_tokens / elapsed, 2) if elapsed > 0.05 else 0.0,
                kv_used=s.n_past,
                origin="this kernel",
            )
        return idle_row(s.id, s.ended, now_mono, kv_used=len(s.cache), tps=0.0, blank=0)
