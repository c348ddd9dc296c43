"""Prompts kept in host RAM: the KV of a slot's sequence, saved when a new request takes the slot.

A slot's own cache serves one prompt family at a time: the next request that
takes the slot cuts it. llama-server keeps host copies of those states
(``--cache-ram``); so does this engine. Before a slot's cached sequence is cut,
its KV is saved (``llama_state_seq_get_data``: the sequence's cells, about
18 KiB a token for the bundled model at f16). A later request whose prompt
starts like a saved one gets that state written back into its slot
(``llama_state_seq_set_data``), which costs a copy, not a prefill.

The restored cells are the bytes the slot held, so the same reuse rule as a
slot's own cache applies (``_prefix.usable_prefix``), reproducible mode included.
This module only books entries and picks one; the runner moves the bytes.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from ._prefix import REUSE_MIN_TOKENS, common_prefix, usable_prefix
from ._slots import SavedPrompt

__all__ = ["DEFAULT_CACHE_RAM_MIB", "RESTORE_MIN_GAIN", "PromptCache", "SavedPrompt"]

#: host RAM for saved prompts unless the load says otherwise (llama-server's default is 8192)
DEFAULT_CACHE_RAM_MIB = 1024
#: a restore must spare at least this many prompt tokens beyond the slot's own cache: writing back
#: 107 tokens' KV took 0.5 ms on the project's CPU, prefilling a token alone about 1.5 ms
RESTORE_MIN_GAIN = 4
_MIB = 1 << 20


class PromptCache:
    """Saved prompts, least recently used first out, within ``limit_mib`` of host RAM.

    Entries are filed by their first ``REUSE_MIN_TOKENS`` tokens: a prompt can only reuse an
    entry that starts the same way, so a lookup reads one bucket, not every entry.
    """

    def __init__(self, limit_mib: int) -> None:
        self.limit = limit_mib * _MIB
        self._entries: OrderedDict[int, SavedPrompt] = OrderedDict()
        self._buckets: dict[bytes, set[int]] = {}
        self._ids = 0
        self.nbytes = 0
        self.saved = 0  # sequences saved over the engine's life

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def __len__(self) -> int:
        return len(self._entries)

    def worth_saving(self, tokens: npt.NDArray[np.int32]) -> bool:
        """Whether a sequence about to be cut is worth its bytes: long enough to reuse, and not
        already held by an entry that starts with all of it."""
        if not self.enabled or len(tokens) < REUSE_MIN_TOKENS:
            return False
        return not any(
            len(e.tokens) >= len(tokens) and common_prefix(e.tokens, tokens) == len(tokens)
            for _, e in self._bucket(tokens)
        )

    def add(self, tokens: npt.NDArray[np.int32], state: bytes | bytearray) -> None:
        """Keep a saved sequence; entries it extends go (it holds all of theirs), then the oldest
        until the total fits. A state larger than the whole budget, or a sequence too short to
        reuse, is not kept."""
        entry = SavedPrompt(tokens.copy(), state)
        if entry.nbytes > self.limit or len(tokens) < REUSE_MIN_TOKENS:
            return
        for key, old in self._bucket(tokens):
            if common_prefix(old.tokens, tokens) == len(old.tokens):
                self._drop(key)
        self._ids += 1
        self._entries[self._ids] = entry
        self._buckets.setdefault(_head(tokens), set()).add(self._ids)
        self.nbytes += entry.nbytes
        self.saved += 1
        while self.nbytes > self.limit:
            self._drop(next(iter(self._entries)))

    def best(
        self, prompt: npt.NDArray[np.int32], prompt_len: int, *, beyond: int, align: int = 1
    ) -> tuple[SavedPrompt, int] | None:
        """The entry that spares ``prompt`` the most prefill, if it spares at least
        ``RESTORE_MIN_GAIN`` tokens more than ``beyond`` (what the slot's own cache gives), and
        how many tokens of it to keep."""
        if len(prompt) < REUSE_MIN_TOKENS:
            return None
        found: tuple[int, SavedPrompt, int] | None = None
        for key, entry in self._bucket(prompt):
            keep = usable_prefix(common_prefix(prompt, entry.tokens), prompt_len, align)
            if keep >= max(beyond + RESTORE_MIN_GAIN, REUSE_MIN_TOKENS) and (
                found is None or keep > found[2]
            ):
                found = (key, entry, keep)
        if found is None:
            return None
        key, entry, keep = found
        self._entries.move_to_end(key)
        return entry, keep

    def clear(self) -> None:
        self._entries.clear()
        self._buckets.clear()
        self.nbytes = 0

    def _bucket(self, tokens: npt.NDArray[np.int32]) -> list[tuple[int, SavedPrompt]]:
        keys = self._buckets.get(_head(tokens), ())
        return [(key, self._entries[key]) for key in keys]

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        head = _head(entry.tokens)
        bucket = self._buckets[head]
        bucket.discard(key)
        if not bucket:
            del self._buckets[head]
        self.nbytes -= entry.nbytes


def _head(tokens: npt.NDArray[np.int32]) -> bytes:
    return tokens[:REUSE_MIN_TOKENS].tobytes()
