"""A remote engine's snapshot: its rows (the server's slots, or this kernel's requests in
flight), the server's figures, and None wherever the server does not say."""

from __future__ import annotations

import time
from typing import Literal

from .. import memory as _memory
from .._api.base import prefix_hit_rate
from .._api.snapshot import (
    EngineSnapshot,
    MemoryFigures,
    RemoteFigures,
    SlotSnapshot,
    idle_row,
)
from ._adapters import ServerState
from ._state import RemoteState
from ._stream import _Request

__all__ = ["RemoteRows", "STALE_STATE"]

STALE_STATE = 1.0  # seconds: an older state is polled again when nothing polls it in the background


class RemoteRows(RemoteState):
    """The snapshot part of ``RemoteEngine``."""

    def snapshot(self) -> EngineSnapshot:
        """The shared snapshot shape; figures the server does not give are None (unknown)."""
        if not self._closed:
            if self._state is None and self._state_error is None:
                self._refresh_state(wait=True)  # the first look: whoever asks waits for it
            elif not self._poller.active and time.monotonic() - self._last_poll > STALE_STATE:
                self._refresh_state()
        now_mono = time.monotonic()
        now_perf = time.perf_counter()
        with self._lock:
            state = self._state
            server_rows = self._rows_are_server_slots()
            slots = self._server_rows(state, now_mono, now_perf) if server_rows else self._lane_rows(now_mono, now_perf)
            books = self._read_books()
            queue_length = len(self._queued)
            in_flight = len(self._inflight)
            error = self._state_error
            server_throughput = self._server_throughput
        info = self._info
        ctx = info.ctx
        models = list(state.models) if state is not None else []
        if info.kind == "ollama":
            entry = next((m for m in models if m["name"] in (info.model, f"{info.model}:latest")), None)
            if entry is not None and entry["context_length"] is not None:
                ctx = entry["context_length"]
        kv_total: int | None = None
        kv_used: int | None = None
        if info.kind == "llama-server" and info.parallel is not None and ctx is not None:
            kv_total = info.parallel * ctx
        elif state is not None and state.kv_total is not None:
            kv_total = state.kv_total
            if state.kv_usage is not None:
                kv_used = round(state.kv_usage * state.kv_total)
        hit_rate = None
        if state is not None and state.prefix_queries:
            hit_rate = round((state.prefix_hits or 0.0) / state.prefix_queries, 4)
        ttft = None
        if state is not None and state.ttft_count:
            ttft = round((state.ttft_sum or 0.0) / state.ttft_count, 4)
        remote = RemoteFigures(
            server_parallel=info.parallel,
            parallel_source=info.parallel_source,
            rows="server slots" if server_rows else "requests in flight",
            max_inflight=self._max_inflight,
            in_flight=in_flight,
            waiting=queue_length,
            server_running=state.running if state is not None else None,
            server_waiting=state.waiting if state is not None else None,
            server_throughput=server_throughput,
            kv_usage=state.kv_usage if state is not None else None,
            prefix_cache_hit_rate=hit_rate,
            server_ttft=ttft,
            models=models,
            metrics=bool(state is not None and state.metrics),
            host_is_local=info.host_is_local,
            version=info.version,
            reachable=error is None,
            error=error,
            polled_at=state.wall if state is not None else None,
        )
        return self._snapshot(
            slots=slots,
            queue_length=queue_length,
            books=books,
            kind=info.kind,
            endpoint=self.url,
            model={
                "name": info.model,
                "path": info.model_path,
                "arch": info.model_family,
                "size_bytes": info.model_size,
                "n_params": info.model_params,
            },
            parallel=len(slots),
            parallel_max=len(slots),
            reproducible=False,
            amx=None,
            ctx_per_slot=ctx,
            n_batch=None,
            gpu_layers=None,
            parallel_reason=self._parallel_reason(server_rows, state),
            kv={"used": kv_used, "total": kv_total, "bytes": None},
            memory=self._memory(),
            prefix_cache={
                "enabled": info.prefix_cache,
                "hit_rate": prefix_hit_rate(books[0]),
                "shared_prefills": None,
                "ram_prompts": None,
                "ram_bytes": None,
            },
            adaptive=None,
            remote=remote,
        )

    def _parallel_reason(self, server_rows: bool, state: ServerState | None) -> str:
        info = self._info
        if server_rows:
            return (
                f"the server's slots ({info.describe_parallel()}); this kernel sends at most "
                f"{self._max_inflight} at once ({self._inflight_reason})"
            )
        note = f"; {state.slots_note}" if state is not None and state.slots_note else ""
        return (
            f"rows are this kernel's requests in flight, at most {self._max_inflight} "
            f"({self._inflight_reason}); server parallel: {info.describe_parallel()}{note}"
        )

    def _memory(self) -> MemoryFigures:
        gpus = _memory.gpu_figures() if self._info.host_is_local else []
        if self._info.host_is_local:
            note = (
                "the server runs on this machine: the GPU figures are this machine's (NVML), the server's use included"
                if gpus
                else "the server runs on this machine, which has no GPU NVML can see; its memory is not measured from here"
            )
        else:
            note = "the server's memory is not visible from this kernel" + (
                " (Ollama's /api/ps gives its models' size)" if self._info.kind == "ollama" else ""
            )
        return MemoryFigures(
            source="remote",
            process_rss=None,
            process_pss=None,
            host_total=None,
            host_available=None,
            gpus=gpus,
            kv_bytes=None,
            kv_estimate="",
            kv_type="",
            note=note,
        )

    def _tps(self, request: _Request, now_perf: float) -> float | None:
        first = request.handle.timing.first_token
        if first is None:
            return None
        elapsed = now_perf - first
        n = request.handle.completion_tokens
        return round(n / elapsed, 2) if elapsed > 0.05 and n else 0.0

    def _idle_row(self, row: int, now_mono: float) -> SlotSnapshot:
        return idle_row(row, self._ended_rows.get(row), now_mono, kv_used=None, tps=None, blank=None)

    def _lane_rows(self, now_mono: float, now_perf: float) -> list[SlotSnapshot]:
        rows: list[SlotSnapshot] = []
        for lane in range(max(self._max_inflight, len(self._lanes))):
            request = self._lanes[lane] if lane < len(self._lanes) else None
            if request is None:
                rows.append(self._idle_row(lane, now_mono))
                continue
            handle = request.handle
            generating = handle.completion_tokens > 0 or handle.timing.first_token is not None
            known = handle.prompt_tokens if request.prompt_known else None
            rows.append(
                SlotSnapshot(
                    id=lane,
                    state="generating" if generating else "sent",
                    badge="generating" if generating else "sent",
                    request_id=handle.id,
                    prompt_preview=request.preview,
                    prompt_tokens=known,
                    prefilled_tokens=known if generating else None,
                    cached_tokens=handle.cached_tokens if request.prompt_known else None,
                    decoded_tokens=handle.completion_tokens,
                    max_tokens=request.max_tokens,
                    tps=self._tps(request, now_perf),
                    kv_used=None,
                    origin="this kernel",
                )
            )
        return rows

    def _server_rows(self, state: ServerState | None, now_mono: float, now_perf: float) -> list[SlotSnapshot]:
        if state is None or state.slots is None:
            return []
        by_slot = {sid: self._inflight.get(rid) for rid, sid in self._slot_of.items()}
        rows: list[SlotSnapshot] = []
        for slot in state.slots:
            request = by_slot.get(slot.id)
            if request is None and slot.processing:
                ended = self._ended_rows.get(slot.id)
                if ended is not None and ended.at >= state.mono:
                    # our request there ended after this poll began: the slot is ours, and done
                    rows.append(self._idle_row(slot.id, now_mono))
                    continue
            if not slot.processing and request is None:
                rows.append(self._idle_row(slot.id, now_mono))
                continue
            prefilled = None
            if slot.prompt_processed is not None:
                prefilled = slot.prompt_processed + (slot.prompt_cached or 0)
            decoded = slot.decoded
            if request is not None:
                decoded = max(decoded, request.handle.completion_tokens)
            generating = decoded > 0  # a slot decodes only once its prompt is read
            state_name: Literal["generating", "prefill"]
            state_name = "generating" if generating else "prefill"
            kv_used = None
            if prefilled is not None:
                kv_used = prefilled + decoded
            if request is not None:
                rows.append(
                    SlotSnapshot(
                        id=slot.id,
                        state=state_name,
                        badge=state_name,
                        request_id=request.id,
                        prompt_preview=request.preview,
                        prompt_tokens=slot.prompt_tokens,
                        prefilled_tokens=prefilled,
                        cached_tokens=slot.prompt_cached,
                        decoded_tokens=decoded,
                        max_tokens=request.max_tokens,
                        tps=self._tps(request, now_perf),
                        kv_used=kv_used,
                        origin="this kernel",
                    )
                )
            else:
                rows.append(
                    SlotSnapshot(
                        id=slot.id,
                        state=state_name,
                        badge=state_name,
                        request_id=None,
                        prompt_preview="",
                        prompt_tokens=slot.prompt_tokens,
                        prefilled_tokens=prefilled,
                        cached_tokens=slot.prompt_cached,
                        decoded_tokens=decoded,
                        max_tokens=slot.max_tokens,
                        tps=self._slot_rates.get(slot.id),
                        kv_used=kv_used,
                        origin="another client",
                    )
                )
        return rows
