"""Format masks: filled while ``llama_decode`` runs, applied only where the argmax is refused.

A mask depends only on what a format has consumed so far (forced tokens
included), never on the logits about to be computed. llguidance releases the
GIL, so a thread of its own fills the next step's masks during the decode
and the engine's thread finds them ready. A greedy slot then checks its
argmax against one bit of the mask and applies the mask only when the
argmax is refused; a sampling slot applies it before its sampler reads the row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import llguidance
import llguidance.numpy
import numpy as np
import numpy.typing as npt

from ._jump import StepTimes
from ._logits import mask_allows, masked_argmax, runners_up

__all__ = ["FormatMasks", "MaskResult"]

#: slot -> its mask row, or why llguidance could not fill it
MaskResult = dict[int, "npt.NDArray[np.int32] | str"]
#: runners-up of a refused argmax checked one by one before a whole mask is filled
RUNNERS_UP = 16
_T = TypeVar("_T")


class FormatMasks:
    """One llguidance bitmask row per sequence, and the thread that fills them ahead."""

    def __init__(self, n_seq: int, n_vocab: int, times: StepTimes) -> None:
        self.n_seq, self.n_vocab = n_seq, n_vocab
        self.times = times
        self._rows: npt.NDArray[np.int32] | None = None
        self._thread: ThreadPoolExecutor | None = None

    def rows(self) -> npt.NDArray[np.int32]:
        if self._rows is None:
            self._rows = llguidance.numpy.allocate_token_bitmask(self.n_seq, self.n_vocab)
        return self._rows

    def ahead(self, matchers: list[tuple[int, llguidance.LLMatcher]]) -> Future[MaskResult] | None:
        """Start filling these slots' masks on the mask thread (None when there are none)."""
        if not matchers:
            return None
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="nbollama-masks")
        return self._thread.submit(_fill, matchers, self.rows(), self.times)

    def join(self, ahead: Future[MaskResult] | None) -> MaskResult:
        """The masks filled during the decode (waiting for the thread if it is not done)."""
        if ahead is None:
            return {}
        start = time.perf_counter()
        masks = ahead.result()
        self.times.add("mask_wait", time.perf_counter() - start)
        return masks

    def pick_greedy(
        self,
        row: npt.NDArray[np.float32],
        matcher: llguidance.LLMatcher,
        slot: int,
        mask: npt.NDArray[np.int32] | None,
    ) -> int:
        """llama.cpp's grammar fast path: the argmax if the format takes it, else the best token
        it allows. Each candidate is checked in the mask filled ahead (one bit) or, without one,
        by llguidance (microseconds); the runners-up near the peak are tried before a whole
        mask is filled. The pick is the masked argmax either way (ties: the lower id): where
        bytes are forced, llguidance's check takes tokens its mask refuses (``{`` where the
        mask asks for ``{"``), so there the mask is filled and decides."""
        times = self.times
        start = time.perf_counter()
        token = int(row.argmax())
        picked = time.perf_counter()
        times.add("sampling", picked - start)
        if mask is not None:
            if not mask_allows(mask, token):
                found = self._first_allowed(row, mask_allows, mask)
                token = found if found is not None else masked_argmax(row, mask)
                times.masks_applied += 1
            times.add("masking", time.perf_counter() - picked)
            return token
        # where bytes are forced (a boundary llguidance left to this token), the mask also asks
        # for their canonical tokens and a token-by-token check does not: the mask decides
        pending = bool(matcher.compute_ff_bytes())
        if not pending and matcher.validate_tokens([token]) == 1:
            times.add("guidance", time.perf_counter() - picked)
            return token
        times.masks_applied += 1
        if not pending:
            found = self._first_allowed(row, lambda m, t: m.validate_tokens([t]) == 1, matcher)
            if found is not None:
                times.add("guidance", time.perf_counter() - picked)
                return found
        rows = self.rows()
        llguidance.numpy.fill_next_token_bitmask(matcher, rows, slot)
        filled = time.perf_counter()
        times.add("guidance", filled - picked)
        token = masked_argmax(row, rows[slot])
        times.add("masking", time.perf_counter() - filled)
        return token

    @staticmethod
    def _first_allowed(
        row: npt.NDArray[np.float32], allows: Callable[[_T, int], bool], by: _T
    ) -> int | None:
        for candidate in runners_up(row, RUNNERS_UP):
            if allows(by, candidate):
                return candidate
        return None

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)


def _fill(
    matchers: list[tuple[int, llguidance.LLMatcher]],
    rows: npt.NDArray[np.int32],
    times: StepTimes,
) -> MaskResult:
    """(The mask thread.) Each matcher's next-token mask into its slot's row; a failure is that
    slot's alone, named."""
    start = time.perf_counter()
    out: MaskResult = {}
    for slot, matcher in matchers:
        try:
            llguidance.numpy.fill_next_token_bitmask(matcher, rows, slot)
            out[slot] = rows[slot]
        except Exception as exc:
            out[slot] = f"{type(exc).__name__}: {exc}"
    times.add("masks_ahead", time.perf_counter() - start)
    return out
