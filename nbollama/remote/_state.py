"""A remote engine's view of the server: polled state, rates, and which slot serves which request.

llama-server's ``/slots`` says what every slot does, for every client; the
poller (``_poller``) reads it at 2 Hz at most while a view watches, and
``_take_state`` keeps the result and matches this kernel's requests to slots.
"""

from __future__ import annotations

import time

from ._adapters import ServerSlot, ServerState
from ._stream import RemoteStreams, _Request

__all__ = ["RemoteState"]


class RemoteState(RemoteStreams):
    """The server-state part of ``RemoteEngine``."""

    def _rows_are_server_slots(self) -> bool:
        if not self._adapter.server_slots or not self._info.slots_endpoint:
            return False
        state = self._state
        return state is None or state.slots is not None

    def _poll_server(self) -> ServerState:
        with self._poll_lock:  # one poll at a time, whoever asks
            state = self._adapter.poll(self._poll_client)
        if state.slots_note:  # a server's error text may echo what it was sent
            state.slots_note = self._connection.scrub(state.slots_note)
        return state

    def _refresh_state(self, *, wait: bool = False) -> None:
        """Poll now, on the caller's thread (nothing polls in the background, or nothing was seen yet).

        Without ``wait`` a poll already under way (the poller's) is not waited for.
        """
        if self._closed or (not wait and self._poll_lock.locked()):
            return
        if time.monotonic() - self._last_poll < 0.5 and (self._state is not None or self._state_error is not None):
            return
        state, error = self._poller.poll_once()
        self._take_state(state, error)

    def _take_state(self, state: ServerState | None, error: str | None) -> None:
        """A poll's outcome (poller thread, or a caller's): keep it and match our requests to slots."""
        with self._lock:
            self._last_poll = time.monotonic()
            if state is None:
                if self._state_error != error:
                    self._state_error = error
                    self._seq += 1
                return
            previous = self._state
            self._state = state
            self._state_error = None
            self._measure(previous, state)
            if state.slots is not None:
                self._match_slots(state.slots)
            key = (
                tuple((s.id, s.processing, s.task, s.decoded, s.prompt_processed) for s in state.slots or ()),
                state.running,
                state.waiting,
                state.kv_usage,
                tuple((m["name"], m["size"], m["size_vram"], m["expires_at"]) for m in state.models),
                state.slots_note,
            )
            if key != self._state_key:
                self._state_key = key
                self._seq += 1
        self._monitor.wake()

    def _measure(self, previous: ServerState | None, state: ServerState) -> None:
        """Rates from two polls: each slot's tokens/s (any client) and the server's throughput."""
        if state.slots is not None:
            marks: dict[int, tuple[int | None, int, float]] = {}
            rates: dict[int, float] = {}
            generated = 0
            span = None
            for slot in state.slots:
                if not slot.processing:
                    continue
                marks[slot.id] = (slot.task, slot.decoded, state.mono)
                before = self._slot_marks.get(slot.id)
                if before is not None and before[0] == slot.task and state.mono > before[2]:
                    dt = state.mono - before[2]
                    rates[slot.id] = round(max(0, slot.decoded - before[1]) / dt, 2)
                    generated += max(0, slot.decoded - before[1])
                    span = dt
            self._slot_marks, self._slot_rates = marks, rates
            if previous is not None and previous.slots is not None:
                dt = state.mono - previous.mono
                self._server_throughput = round(generated / (span or dt), 2) if (span or dt) > 0 else None
        elif state.generated_total is not None and previous is not None and previous.generated_total is not None:
            dt = state.mono - previous.mono
            if dt > 0:
                self._server_throughput = round(max(0.0, state.generated_total - previous.generated_total) / dt, 2)

    def _match_slots(self, slots: list[ServerSlot]) -> None:
        """Which server slot serves which of our requests (llama-server tells only at the end).

        A request of ours fits a busy slot when the slot's ``n_predict`` is its
        ``max_tokens``; among fits, the closest decoded count (then prompt
        length) wins, and a match sticks while it fits. Requests sent but not
        yet started take the slots still reading a prompt.
        """
        busy = {s.id: s for s in slots if s.processing}
        sent = [r for r in self._inflight.values() if r.handle.sent_at is not None]
        ours = [r for r in sent if r.started or r.handle.completion_tokens > 0]
        waiting = sorted((r for r in sent if r not in ours), key=lambda r: r.handle.sent_at or 0.0)
        taken: set[int] = set()
        matched: dict[int, int] = {}

        def fits(request: _Request, slot: ServerSlot) -> bool:
            return slot.max_tokens is None or slot.max_tokens == request.max_tokens

        def cost(request: _Request, slot: ServerSlot) -> int:
            # /slots' prompt counts move while a prompt is read (and differ between builds):
            # they break ties, the decoded count leads
            known = request.handle.prompt_tokens if request.prompt_known else None
            differs = known is not None and slot.prompt_tokens is not None and slot.prompt_tokens != known
            return abs(slot.decoded - request.handle.completion_tokens) + (3 if differs else 0)

        for request in ours:
            sid = request.handle.server_slot if request.handle.server_slot is not None else self._slot_of.get(request.id)
            slot = busy.get(sid) if sid is not None else None
            if slot is not None and sid not in taken and fits(request, slot):
                matched[request.id] = slot.id
                taken.add(slot.id)
        pairs = sorted(
            (cost(r, slot), r.order, r.id, slot.id)
            for r in ours
            if r.id not in matched
            for slot in busy.values()
            if slot.id not in taken and fits(r, slot)
        )
        for _, _, rid, sid in pairs:
            if rid in matched or sid in taken:
                continue
            matched[rid] = sid
            taken.add(sid)
        # Sent, but the server has not said it started (its first progress event may not have
        # come yet): a slot with our max_tokens is most likely ours: the one it had, else one
        # still reading a prompt, else one already decoding (a fast server runs ahead of the stream).
        for request in waiting:
            sid = self._slot_of.get(request.id)
            free = [s for s in busy.values() if s.id not in taken and fits(request, s)]
            slot = min(free, key=lambda s: (s.id != sid, s.decoded > 0, s.id), default=None)
            if slot is not None:
                matched[request.id] = slot.id
                taken.add(slot.id)
        self._slot_of = matched
        for rid, sid in matched.items():
            placed = self._inflight.get(rid)
            if placed is not None:
                placed.handle._place(sid)
