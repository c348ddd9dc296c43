"""A request's progress inside the engine, and the slots that serve requests.

Like nano-vllm's ``sequence.py``: plain state, no policy. The scheduler
decides which slot takes which request and what each step decodes; the
runner decodes and samples; the engine moves requests through these states.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ._requests import FinishReason, Handle, SamplingParams
from ._snapshot import SlotBadge, SlotState

if TYPE_CHECKING:
    from ._llama import Sampler
    from ._text import TextStream

__all__ = ["Request", "Slot", "BADGE_FOR_REASON"]

BADGE_FOR_REASON: dict[FinishReason, SlotBadge] = {
    "stop": "done",
    "length": "done",
    "cancelled": "cancelled",
    "error": "error",
}


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
    n_prefilled: int = 0
    completion_tokens: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.tokens)

    @property
    def prefill_remaining(self) -> int:
        return len(self.tokens) - self.n_prefilled


@dataclass(eq=False)
class Slot:
    """One sequence of the context: idle, or serving a request."""

    id: int
    state: SlotState = "idle"
    request: Request | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    last_token: int = 0  # sampled, not yet decoded
    # how the last request ended, shown for a moment as the slot's badge
    last_request_id: int | None = None
    last_preview: str = ""
    last_badge: SlotBadge = "idle"
    last_finished: float = 0.0
    last_counts: tuple[int, int, int] = (0, 0, 0)  # prompt, decoded, max of the last request

    @property
    def busy(self) -> bool:
        return self.request is not None

    def take(self, request: Request, order: int) -> None:
        """Bind a request (under the engine's lock): from now on the slot is prefilling it."""
        request.admitted_order = order
        self.request = request
        self.state = "prefill"
        self.n_past = 0

    def release(self, reason: FinishReason) -> Request | None:
        """Unbind the request (under the engine's lock) and remember how it ended."""
        request = self.request
        if request is None:
            return None
        self.request = None
        self.state = "idle"
        self.n_past = 0
        self.last_request_id = request.handle.id
        self.last_preview = request.preview
        self.last_badge = BADGE_FOR_REASON[reason]
        self.last_finished = time.monotonic()
        self.last_counts = (request.prompt_len, request.completion_tokens, request.params.max_tokens)
        return request
