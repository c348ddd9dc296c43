"""The plain-data shape of an engine snapshot.

Widgets, the comm to the JupyterLab panel and the magics all read this one
shape, so it is JSON-serialisable throughout (no numpy, no enums) and carries
a version number ``v`` that changes only when a field changes meaning.
"""

from __future__ import annotations

from typing import Literal, TypedDict

__all__ = [
    "SNAPSHOT_VERSION",
    "SlotState",
    "SlotBadge",
    "SlotSnapshot",
    "QueueSnapshot",
    "KVSnapshot",
    "GPUFigures",
    "MemoryFigures",
    "CompletedRequest",
    "Totals",
    "ModelSnapshot",
    "EngineSnapshot",
]

SNAPSHOT_VERSION = 1

#: What the slot is doing right now (llama.cpp's server uses the same words).
SlotState = Literal["idle", "prefill", "generating"]
#: What a UI should show: the state, or for a short while after a request
#: ended, how it ended.
SlotBadge = Literal["idle", "prefill", "generating", "done", "cancelled", "error"]


class SlotSnapshot(TypedDict):
    id: int
    state: SlotState
    badge: SlotBadge
    request_id: int | None  # the request being served, else the last one served
    prompt_preview: str  # first ~80 characters, newlines folded
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens already in the KV cache
    decoded_tokens: int
    max_tokens: int
    tps: float  # this request's generated tokens/s so far (gen_tps)
    kv_used: int  # KV cells this slot's sequence holds


class QueueSnapshot(TypedDict):
    length: int
    max: int


class KVSnapshot(TypedDict):
    used: int  # cells holding tokens, summed over slots
    total: int  # parallel x ctx per slot
    bytes: int  # size of the KV cache buffers


class GPUFigures(TypedDict):
    index: int
    name: str
    total: int  # bytes
    used: int
    free: int
    process_used: int | None  # this process's share, when the driver tells


class MemoryFigures(TypedDict):
    source: Literal["nvml", "host"]
    process_rss: int  # bytes
    process_pss: int | None  # proportional set size, Linux only
    host_total: int
    host_available: int
    gpus: list[GPUFigures]
    kv_bytes: int
    kv_estimate: str  # "4 slots x 2048 ctx x 18.0 KiB/token = 144 MiB"
    note: str  # why the figures come from where they do (e.g. NVML's error)


class CompletedRequest(TypedDict):
    id: int
    slot: int | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None
    tpot: float | None
    queue_wait: float
    total_time: float
    finished_at: float  # time.time()


class Totals(TypedDict):
    submitted: int
    completed: int  # finished with "stop" or "length"
    cancelled: int
    errors: int
    prompt_tokens: int
    generated_tokens: int


class ModelSnapshot(TypedDict):
    name: str
    path: str
    arch: str
    size_bytes: int
    n_params: int


class EngineSnapshot(TypedDict):
    v: int
    time: float  # time.time() when taken
    seq: int  # increases whenever anything in the engine changed
    closed: bool
    model: ModelSnapshot
    parallel: int
    ctx_per_slot: int
    n_batch: int
    gpu_layers: int
    parallel_reason: str  # why parallel is what it is
    slots: list[SlotSnapshot]
    queue: QueueSnapshot
    throughput: float  # aggregate generated tokens/s over the window
    throughput_window: float  # seconds
    busy_slots: int
    kv: KVSnapshot
    memory: MemoryFigures
    totals: Totals
    recent: list[CompletedRequest]  # the last few finished requests, oldest first
