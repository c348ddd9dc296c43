"""What one poll of a server finds, in nbollama's words: its slots (llama-server's ``/slots``)
and its gauges (vLLM's ``/metrics``, Ollama's ``/api/ps``).

Kept apart from the adapters so that the requests and streams of each kind
(``_adapters``) and what its polls read stay small enough to read at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .._api.snapshot import RemoteModelFigures
from ._metrics import Metrics

__all__ = ["ServerSlot", "ServerState", "as_int", "as_number", "llama_slots", "vllm_state"]


@dataclass(frozen=True)
class ServerSlot:
    """One llama-server slot, as ``/slots`` describes it."""

    id: int
    processing: bool
    task: int | None = None
    n_ctx: int | None = None
    prompt_tokens: int | None = None
    prompt_processed: int | None = None
    prompt_cached: int | None = None
    decoded: int = 0
    max_tokens: int | None = None  # n_predict; None when unlimited


@dataclass
class ServerState:
    """What one poll found (every field None/empty when the server does not tell)."""

    wall: float = field(default_factory=time.time)
    mono: float = field(default_factory=time.monotonic)
    slots: list[ServerSlot] | None = None
    slots_note: str = ""  # why there are no slots (e.g. llama-server --no-slots)
    running: int | None = None
    waiting: int | None = None
    generated_total: float | None = None  # counter: tokens generated since the server started
    kv_usage: float | None = None  # 0..1
    kv_total: int | None = None  # tokens
    prefix_hits: float | None = None
    prefix_queries: float | None = None
    ttft_sum: float | None = None
    ttft_count: float | None = None
    models: list[RemoteModelFigures] = field(default_factory=list)
    metrics: bool = False


def as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def vllm_state(metrics: Metrics, state: ServerState, kv_total: int | None) -> None:
    running = metrics.total("vllm:num_requests_running")
    waiting = metrics.total("vllm:num_requests_waiting")
    state.running = None if running is None else int(running)
    state.waiting = None if waiting is None else int(waiting)
    state.kv_usage = metrics.mean("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    state.kv_total = kv_total
    info = metrics.labels("vllm:cache_config_info")
    if info and state.kv_total is None:
        try:
            state.kv_total = int(float(info["num_gpu_blocks"])) * int(float(info["block_size"]))
        except (KeyError, ValueError, TypeError):
            pass
    state.prefix_hits = metrics.total("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
    state.prefix_queries = metrics.total("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
    state.ttft_sum = metrics.total("vllm:time_to_first_token_seconds_sum")
    state.ttft_count = metrics.total("vllm:time_to_first_token_seconds_count")
    state.generated_total = metrics.total("vllm:generation_tokens_total")


def llama_slots(data: Any) -> list[ServerSlot]:
    slots: list[ServerSlot] = []
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict) or as_int(item.get("id")) is None:
            continue
        nxt = item.get("next_token")
        if isinstance(nxt, list):  # an object in the README, a one-element array in newer builds
            nxt = nxt[0] if nxt else {}
        nxt = nxt if isinstance(nxt, dict) else {}
        params = item.get("params")
        params = params if isinstance(params, dict) else {}
        n_predict = as_int(params.get("n_predict"))
        if n_predict is None:
            n_predict = as_int(params.get("max_tokens"))
        processing = bool(item.get("is_processing", item.get("state", 0) != 0))
        decoded = (as_int(nxt.get("n_decoded")) or 0) if processing else 0
        prompt = as_int(item.get("n_prompt_tokens")) if processing else None
        processed = as_int(item.get("n_prompt_tokens_processed")) if processing else None
        cached = as_int(item.get("n_prompt_tokens_cache")) if processing else None
        if decoded > 0 and processed is not None:
            # generating: the prompt is read in full; n_prompt_tokens also counts the tokens
            # generated so far in current builds, so the prompt is what was processed or cached
            prompt = processed + (cached or 0)
        slots.append(
            ServerSlot(
                id=int(item["id"]),
                processing=processing,
                task=as_int(item.get("id_task")) if processing else None,
                n_ctx=as_int(item.get("n_ctx")),
                prompt_tokens=prompt,
                prompt_processed=processed,
                prompt_cached=cached,
                decoded=decoded,
                max_tokens=n_predict if n_predict is not None and n_predict > 0 else None,
            )
        )
    return sorted(slots, key=lambda s: s.id)
