"""What the engine reads from a slot's logits row besides the token: log-probabilities, and the
token mask of a format the output must follow.

Pure numpy over one row of the vocabulary (262k entries for Gemma 3), so
every function here is cheap enough to run per slot and step, and only for
requests that asked: one log-sum-exp per row, a partial selection for the top
K (never a full sort), and a mask applied only when the token picked first is
not allowed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from .._api.outputs import TokenLogprob, TopLogprob

__all__ = [
    "RowStats",
    "row_stats",
    "entry_for",
    "apply_mask",
    "mask_allows",
    "masked_argmax",
    "runners_up",
]

#: the top K are looked for among the logits this far under the row's max, widening in turn
_MARGINS = (8.0, 16.0, 32.0)


class RowStats:
    """One row's log-sum-exp and its top-K token ids (best first) with their logits, read before
    any mask lowers them."""

    __slots__ = ("lse", "top", "top_values")

    def __init__(self, lse: float, top: npt.NDArray[np.int64], top_values: list[float]) -> None:
        self.lse = lse
        self.top = top
        self.top_values = top_values


def _top_k(row: npt.NDArray[np.float32], k: int, peak: float) -> npt.NDArray[np.int64]:
    """The ``k`` largest entries' ids, best first (ties: the lower id), without sorting the row.

    Candidates are the entries within a margin of the maximum (a few dozen in
    a real model's row); only a row so peaked that fewer than ``k`` are within
    the widest margin falls back to a partial selection over the whole row.
    """
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    for margin in _MARGINS:
        candidates = np.flatnonzero(row >= peak - margin)
        if len(candidates) >= k:
            break
    else:
        candidates = np.argpartition(-row, k - 1)[:k]
    values = row[candidates]
    if len(candidates) > 4 * k:
        keep = np.argpartition(-values, k - 1)[:k]
        candidates, values = candidates[keep], values[keep]
    order = np.lexsort((candidates, -values))[:k]
    return candidates[order].astype(np.int64)


def row_stats(row: npt.NDArray[np.float32], k: int) -> RowStats:
    """Log-sum-exp (in float64, from the max) and the top ``k`` of a raw logits row."""
    peak = float(row.max())
    lse = peak + float(np.log(np.exp(row - peak).sum(dtype=np.float64)))
    top = _top_k(row, k, peak)
    return RowStats(lse, top, row[top].tolist())


def _text_of(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def entry_for(
    row: npt.NDArray[np.float32],
    stats: RowStats,
    token: int,
    piece: Callable[[int], bytes],
) -> TokenLogprob:
    """``token``'s entry in OpenAI's shape, with the row's top K as its alternatives.

    The row must still hold the model's value at ``token`` (a mask only
    lowers the tokens it forbids, never the one chosen).
    """
    data = piece(token)
    top: list[TopLogprob] = []
    for alt, value in zip(stats.top.tolist(), stats.top_values):
        alt_bytes = piece(alt)
        top.append(
            TopLogprob(
                token=_text_of(alt_bytes),
                logprob=value - stats.lse,
                bytes=list(alt_bytes),
                id=alt,
            )
        )
    return TokenLogprob(
        token=_text_of(data),
        logprob=float(row[token]) - stats.lse,
        bytes=list(data),
        id=token,
        top_logprobs=top,
    )


def _allowed(mask: npt.NDArray[np.int32], n_vocab: int) -> npt.NDArray[np.bool_]:
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    return bits[:n_vocab].astype(bool)


def apply_mask(row: npt.NDArray[np.float32], mask: npt.NDArray[np.int32]) -> None:
    """Set every token the mask forbids to -inf, in place (the row llama.cpp's sampler reads)."""
    row[~_allowed(mask, len(row))] = -np.inf


def runners_up(row: npt.NDArray[np.float32], limit: int) -> list[int]:
    """The best ``limit`` tokens after the argmax, best first (ties: the lower id), from the
    entries near the row's peak (an exact prefix of the row's order: fewer when few are near).

    Where a format refuses a greedy slot's argmax, its best allowed token is
    nearly always among these: checking them one by one against the format
    costs microseconds where a mask over 262k tokens costs a millisecond.
    """
    peak = float(row.max())
    candidates = np.flatnonzero(row >= peak - _MARGINS[0])
    values = row[candidates]
    order = np.lexsort((candidates, -values))[1 : limit + 1]
    return [int(t) for t in candidates[order]]


def mask_allows(mask: npt.NDArray[np.int32], token: int) -> bool:
    """Whether the mask allows ``token``: one bit, where asking llguidance would walk its parser."""
    return bool((int(mask[token >> 5]) >> (token & 31)) & 1)


def masked_argmax(row: npt.NDArray[np.float32], mask: npt.NDArray[np.int32]) -> int:
    """The best allowed token, without writing to the row (ties: the lower id, as argmax).

    Only the mask's non-zero words are expanded: a format usually allows a
    few hundred tokens of the 262k, so this reads far less than the row.
    """
    words = np.flatnonzero(mask)
    bits = np.unpackbits(mask[words].view(np.uint8), bitorder="little").reshape(-1, 32)
    ids = ((words[:, None] << 5) + np.arange(32))[bits.astype(bool)]
    ids = ids[ids < len(row)]
    if not len(ids):
        raise ValueError("the format allows no token here")
    return int(ids[int(np.argmax(row[ids]))])
