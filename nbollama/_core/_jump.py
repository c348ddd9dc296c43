"""Jump-forward decoding: the tokens a format forces, taken without sampling, and what masks cost.

Where a format allows exactly one continuation (a JSON key, the rest of an
enum's word, a regex's literal), sampling it token by token spends a decode
step and a mask per token on a foregone conclusion. SGLang appends such a run
in one step; llguidance names it: ``compute_ff_tokens`` gives the forced
tokens, ``consume_tokens`` takes them. The engine then decodes them as one
chunk in the slot's next batch entry, as it decodes a prompt chunk.

Tokenization follows llguidance's own rule: the forced bytes are tokenized
canonically, and the trailing tokens that a longer token could still merge
with the next bytes are left out (their bytes must begin the next sampled
token, which the mask enforces). So ``"tags": [`` is not forced as ``[``
when the model may write ``["`` in one token.

``StepTimes`` keeps where a constrained step's time goes (llguidance, masks,
sampling), for the benchmark to show.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import llguidance

__all__ = ["MAX_FORCED", "MAX_FORCED_WITH_ROWS", "forced_room", "take_forced", "StepTimes"]

#: The most forced tokens one slot's batch entry takes at once; the rest are sampled under the mask.
MAX_FORCED = 32
#: With logprobs every forced token gets a logits row (n_vocab floats each in llama.cpp's output
#: buffer, 1 MiB for Gemma): fewer at once.
MAX_FORCED_WITH_ROWS = 8


def forced_room(
    *, max_tokens_left: int, ctx_left: int, n_batch: int, n_seq: int, with_rows: bool
) -> int:
    """How many forced tokens one slot may queue now.

    ``max_tokens_left``: what ``max_tokens`` still allows (forced tokens count);
    ``ctx_left``: positions left in the slot's context after the tokens it
    already has to decode; the batch must hold every slot's entry
    (``n_batch // n_seq`` tokens each, one of them the slot's own).
    """
    cap = MAX_FORCED_WITH_ROWS if with_rows else MAX_FORCED
    return max(0, min(cap, max_tokens_left, ctx_left, n_batch // max(n_seq, 1) - 1))


def take_forced(matcher: llguidance.LLMatcher, room: int) -> list[int]:
    """The tokens the format forces from its state now (at most ``room``), consumed by the matcher.

    Raises ``ValueError`` with llguidance's message when the matcher refuses
    its own forced tokens (it is then in an error state).
    """
    if room <= 0 or matcher.is_stopped():
        return []
    forced = matcher.compute_ff_tokens()[:room]
    if forced and not matcher.consume_tokens(forced):
        raise ValueError(f"the format refused its own forced tokens: {matcher.get_error()}")
    return forced


class StepTimes:
    """Seconds the engine's thread spent per part of its steps, and tokens sampled or forced.

    ``guidance``: llguidance on the engine's thread (consuming tokens,
    forced tokens, a mask filled because none was ready); ``masks_ahead``: masks
    filled on the mask thread while a decode ran (overlapped, not on the
    step's path); ``mask_wait``: the engine's thread waiting for those masks
    after its decode; ``masking``: applying a mask or checking the argmax
    against it; ``sampling``: picking the token from the row.
    """

    FIELDS = ("decode", "guidance", "masks_ahead", "mask_wait", "masking", "sampling")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the mask thread adds masks_ahead
        self.seconds = dict.fromkeys(self.FIELDS, 0.0)
        self.steps = 0
        self.sampled = 0  # constrained tokens sampled (under a mask or its argmax check)
        self.forced = 0  # tokens taken without sampling
        self.masks_applied = 0  # samples where the argmax was refused, or the sampler needed the mask

    def add(self, part: str, seconds: float) -> None:
        with self._lock:
            self.seconds[part] += seconds

    @contextmanager
    def timing(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(part, time.perf_counter() - start)

    def as_dict(self, *, reset: bool = False) -> dict[str, float]:
        """Totals (``*_s`` seconds, counts); ``reset`` starts new totals."""
        with self._lock:
            out: dict[str, float] = {f"{k}_s": v for k, v in self.seconds.items()}
            out.update(
                steps=self.steps,
                sampled=self.sampled,
                forced=self.forced,
                masks_applied=self.masks_applied,
            )
            if reset:
                self.seconds = dict.fromkeys(self.FIELDS, 0.0)
                self.steps = self.sampled = self.forced = self.masks_applied = 0
        return out
