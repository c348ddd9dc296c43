"""Prefix reuse: which slot a request goes to, and where its prompt's start can be copied from.

Two kinds of reuse, both decided here without touching llama.cpp:

* **its own slot's cache**: a finished slot keeps its tokens' KV, and a new
  request goes to the idle slot whose cached tokens share the longest prefix
  with its prompt (llama-server's slot similarity, without its threshold:
  any shared token is free to keep). Only the rest is prefilled.
* **another slot's sequence**: when some other slot holds (or is about to
  hold) a long stretch of the same prompt, the request waits for it and gets
  a copy (``llama_memory_seq_cp``) instead of prefilling it again. This is how
  one system prompt in front of sixteen questions is prefilled once.

At least one prompt token is always evaluated, so there are logits to sample from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ._slots import Request, Slot, Source

__all__ = [
    "REUSE_MIN_TOKENS",
    "SHARE_MIN_TOKENS",
    "common_prefix",
    "choose_slot",
    "Source",
    "find_source",
    "usable_prefix",
]

#: A slot's own cache is reused from this many shared tokens on. Fewer (a BOS
#: token, a common first word) save nothing worth changing how the prompt is
#: prefilled, which would change llama.cpp's numerics for nothing.
REUSE_MIN_TOKENS = 16

#: A copy from another slot must save at least this many prompt tokens. With a KV
#: stream per slot the copy moves the source's whole stream (about 18 MB at 1024
#: ctx for the bundled model), which costs what prefilling a few dozen tokens does.
SHARE_MIN_TOKENS = 32


def common_prefix(a: npt.NDArray[np.int32], b: npt.NDArray[np.int32]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def usable_prefix(shared: int, prompt_len: int, align: int) -> int:
    """Reuse stops one token short of the whole prompt (its last token must be evaluated), and
    at a multiple of ``align`` (reproducible mode prefills in fixed chunks from position 0)."""
    usable = min(shared, prompt_len - 1)
    usable -= usable % align
    return usable if usable >= REUSE_MIN_TOKENS else 0


def choose_slot(
    request: Request, idle: Sequence[Slot], *, reuse: bool, align: int = 1
) -> tuple[Slot, int]:
    """The idle slot for ``request`` and how many of its prompt tokens its cache already holds.

    With reuse: the longest shared prefix wins (ties: the slot used longest
    ago); with nothing shared, the least recently used slot, so other
    caches stay for the prompts that match them. Without reuse: the lowest slot.
    """
    if not reuse:
        return idle[0], 0
    best, best_keep = None, -1
    for slot in idle:
        keep = usable_prefix(common_prefix(request.tokens, slot.cache), request.prompt_len, align)
        if keep > best_keep or (
            keep == best_keep and best is not None and slot.last_used < best.last_used
        ):
            best, best_keep = slot, keep
    assert best is not None
    return best, best_keep


def find_source(
    request: Request,
    target: Slot,
    slots: Sequence[Slot],
    own: int,
    *,
    align: int = 1,
    prompt_only: bool = False,
) -> Source | None:
    """Another slot whose sequence starts like ``request``'s prompt, if copying it saves enough.

    A slot counts with the tokens it will hold once its own prompt is in:
    an idle slot its cache, a busy one its prompt and what it generated
    (only its prompt with ``prompt_only``: generated tokens were computed by
    decode steps, not by prefill chunks). ``own`` is what the target slot's
    own cache already gives.
    """
    best: Source | None = None
    for slot in slots:
        if slot is target:
            continue
        held = slot.sequence_tokens(prompt_only=prompt_only)
        shared = usable_prefix(common_prefix(request.tokens, held), request.prompt_len, align)
        if shared - own >= SHARE_MIN_TOKENS and (best is None or shared > best.tokens):
            best = Source(slot.id, shared, ready=slot.n_past >= shared)
    return best
