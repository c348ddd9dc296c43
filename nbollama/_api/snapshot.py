"""The plain-data shape of an engine snapshot.

Widgets, the comm to the JupyterLab panel and the magics all read this one
shape, so it is JSON-serialisable throughout (no numpy, no enums) and carries
a version number ``v`` that changes only when a field changes meaning.

A remote engine (``nbollama.remote``) fills the same shape. Where a server does
not give a figure, the field is ``None`` ("unknown"), never a made-up number;
those fields are marked "None: unknown remotely" below, and the in-kernel
engine always fills them. Only a remote snapshot has the ``remote`` block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypedDict

if TYPE_CHECKING:
    from .requests import FinishReason, Result

__all__ = [
    "completed_request",
    "BADGE_SECONDS",
    "BADGE_FOR_REASON",
    "EndedRequest",
    "idle_row",
    "SNAPSHOT_VERSION",
    "SlotState",
    "SlotBadge",
    "SlotOrigin",
    "SlotSnapshot",
    "PrefixCacheFigures",
    "ParallelChange",
    "AdaptiveFigures",
    "EngineKind",
    "QueueSnapshot",
    "KVSnapshot",
    "GPUFigures",
    "MemoryFigures",
    "CompletedRequest",
    "Totals",
    "ModelSnapshot",
    "EngineSnapshot",
    "RemoteModelFigures",
    "RemoteFigures",
]

SNAPSHOT_VERSION = 1

#: What the slot is doing right now (llama.cpp's server uses the same words).
#: "sent" is a remote engine's only: the request went to a server that shows no
#: slots (Ollama, vLLM) and no token has come back yet (queued there, or prefilling).
SlotState = Literal["idle", "prefill", "generating", "sent"]
#: What a UI should show: the state, or for a short while after a request
#: ended, how it ended.
SlotBadge = Literal["idle", "prefill", "generating", "sent", "done", "cancelled", "error"]

#: How long a slot shows how its last request ended.
BADGE_SECONDS = 2.0

BADGE_FOR_REASON: dict[FinishReason, SlotBadge] = {
    "stop": "done",
    "length": "done",
    "cancelled": "cancelled",
    "error": "error",
}



#: Whose request a slot serves: this kernel's, or (on a shared server) someone else's.
SlotOrigin = Literal["this kernel", "another client"]


class SlotSnapshot(TypedDict):
    id: int
    state: SlotState
    badge: SlotBadge
    request_id: int | None  # the request being served, else the last one served
    prompt_preview: str  # first ~80 characters, newlines folded
    prompt_tokens: int | None  # None: unknown remotely (Ollama tells at the end)
    prefilled_tokens: (
        int | None
    )  # prompt tokens already in the KV cache (cached ones included); None: unknown remotely
    cached_tokens: (
        int | None
    )  # of those, taken from the prefix cache instead of computed; None: unknown remotely
    decoded_tokens: int
    max_tokens: int | None  # None: unknown remotely (another client's request without a limit)
    tps: (
        float | None
    )  # this request's generated tokens/s so far (gen_tps); None: not measured yet remotely
    kv_used: (
        int | None
    )  # KV cells this slot's sequence holds (an idle slot keeps its cached prefix); None: unknown remotely
    origin: SlotOrigin


@dataclass(frozen=True)
class EndedRequest:
    """How a row's last request ended: its badge for ``BADGE_SECONDS``, its figures after."""

    badge: SlotBadge
    request_id: int
    preview: str
    prompt_tokens: int | None  # None: a server that did not say
    cached_tokens: int | None
    decoded: int
    max_tokens: int
    at: float  # time.monotonic() when it ended

    @classmethod
    def of(
        cls, reason: FinishReason, result: Result, preview: str, max_tokens: int, *, known: bool
    ) -> EndedRequest:
        """From a finished ``Result``; ``known``: the prompt's token counts are known."""
        return cls(
            badge=BADGE_FOR_REASON[reason],
            request_id=result.id,
            preview=preview,
            prompt_tokens=result.prompt_tokens if known else None,
            cached_tokens=result.cached_tokens if known else None,
            decoded=result.completion_tokens,
            max_tokens=max_tokens,
            at=time.monotonic(),
        )

    def showing(self, now: float) -> bool:
        """Whether the row still shows how it ended (``now``: ``time.monotonic()``)."""
        return now - self.at < BADGE_SECONDS


def idle_row(
    row: int,
    ended: EndedRequest | None,
    now: float,
    *,
    kv_used: int | None,
    tps: float | None,
    blank: int | None,
) -> SlotSnapshot:
    """An idle row: how its last request ended (the badge only for a moment), or nothing yet.

    ``blank`` is what a row that never served shows for its counts: 0 in the kernel, None
    where a server does not say."""
    if ended is None:
        ended = EndedRequest("idle", 0, "", blank, blank, 0, 0, 0.0)
        request_id, max_tokens = None, blank
    else:
        request_id, max_tokens = ended.request_id, ended.max_tokens
    return SlotSnapshot(
        id=row,
        state="idle",
        badge=ended.badge if ended.showing(now) else "idle",
        request_id=request_id,
        prompt_preview=ended.preview,
        prompt_tokens=ended.prompt_tokens,
        prefilled_tokens=ended.prompt_tokens,
        cached_tokens=ended.cached_tokens,
        decoded_tokens=ended.decoded,
        max_tokens=max_tokens,
        tps=tps,
        kv_used=kv_used,
        origin="this kernel",
    )


class QueueSnapshot(TypedDict):
    length: int
    max: int


class KVSnapshot(TypedDict):
    used: int | None  # cells holding tokens, summed over slots; None: unknown remotely
    total: (
        int | None
    )  # parallel x ctx per slot (a server's own total remotely); None: unknown remotely
    bytes: int | None  # size of the KV cache buffers; None: unknown remotely


class GPUFigures(TypedDict):
    index: int
    name: str
    total: int  # bytes
    used: int
    free: int
    process_used: int | None  # this process's share, when the driver tells


class MemoryFigures(TypedDict):
    # "remote": a server's memory, which this kernel cannot measure; the process and
    # host figures are then None, and ``gpus`` holds this machine's GPUs only when
    # the server runs on this machine (the note says so).
    source: Literal["nvml", "host", "remote"]
    process_rss: int | None  # bytes; None: remote
    process_pss: int | None  # proportional set size, Linux only
    host_total: int | None  # None: remote
    host_available: int | None  # None: remote
    gpus: list[GPUFigures]
    kv_bytes: int | None  # None: unknown remotely
    kv_estimate: str  # "4 slots x 2048 ctx x 18.0 KiB/token (f16) = 144 MiB"
    kv_type: str  # "f16", "q8_0", "K q8_0 / V f16"; "" when unknown (a server's)
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


def completed_request(result: Result) -> CompletedRequest:
    """The line a finished request leaves in a snapshot's ``recent`` (either kind of engine)."""
    return CompletedRequest(
        id=result.id,
        slot=result.slot,
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        ttft=result.ttft,
        tpot=result.tpot,
        queue_wait=result.queue_wait,
        total_time=result.total_time,
        finished_at=time.time(),
    )


class Totals(TypedDict):
    submitted: int
    completed: int  # finished with "stop" or "length"
    cancelled: int
    errors: int
    prompt_tokens: int  # prompt tokens of admitted requests, cached ones included
    generated_tokens: int
    cached_tokens: int  # prompt tokens that were reused instead of computed


class PrefixCacheFigures(TypedDict):
    enabled: bool | None  # None: unknown remotely
    hit_rate: float  # cached_tokens / prompt_tokens over the engine's life (0 with no prompts)
    shared_prefills: int | None  # prefixes computed once and copied to other slots; None: remote
    ram_prompts: int | None  # prompts kept in host RAM after their slot moved on; None: remote
    ram_bytes: int | None  # their KV bytes


class ParallelChange(TypedDict):
    time: float  # time.time()
    parallel: int
    reason: str


class AdaptiveFigures(TypedDict):
    target: str  # "min_tps=15", "max_ttft=2", "throughput"
    history: list[ParallelChange]  # the last changes, oldest first


class ModelSnapshot(TypedDict):
    name: str
    path: str
    arch: str  # "" when a server does not say
    size_bytes: int | None  # None: unknown remotely
    n_params: int | None  # None: unknown remotely


#: What kind of engine a snapshot describes.
EngineKind = Literal["local", "llama-server", "ollama", "vllm", "openai"]


class RemoteModelFigures(TypedDict):
    """A model a server holds in memory (Ollama's ``/api/ps``)."""

    name: str
    size: int | None  # bytes the server holds for it (weights and KV cache)
    size_vram: int | None  # of those, on GPUs
    context_length: int | None
    expires_at: str | None  # when the server unloads it if idle


class RemoteFigures(TypedDict):
    """What a remote engine knows of its server, beyond the shape every engine fills."""

    server_parallel: (
        int | None
    )  # the server's own: total_slots, OLLAMA_NUM_PARALLEL, --max-num-seqs
    parallel_source: str  # where that came from, or why it is unknown
    rows: Literal["server slots", "requests in flight"]  # what ``slots`` lists
    max_inflight: int  # this kernel's limit on requests open at once
    in_flight: int  # this kernel's requests sent and not finished
    waiting: int  # this kernel's requests in nbollama's own queue (== queue.length)
    server_running: int | None  # requests the server runs now, all clients (/metrics)
    server_waiting: int | None  # requests the server holds back (deferred, waiting), all clients
    server_throughput: float | None  # generated tokens/s on the server, all clients
    kv_usage: float | None  # 0..1 of the server's KV cache in use (vLLM)
    prefix_cache_hit_rate: float | None  # the server's own, all clients (vLLM)
    server_ttft: float | None  # mean TTFT in seconds, from the server's histogram (vLLM)
    models: list[RemoteModelFigures]
    metrics: bool  # /metrics answered at the last poll
    host_is_local: bool  # the server runs on this machine (then gpus are this machine's)
    version: str | None
    reachable: bool  # the last poll (or request) reached the server
    error: str | None  # why the last poll failed
    polled_at: float | None  # time.time() of the last poll that answered


class _RemotePart(TypedDict, total=False):
    remote: RemoteFigures  # only in a remote engine's snapshot


class EngineSnapshot(_RemotePart):
    v: int
    time: float  # time.time() when taken
    seq: int  # increases whenever anything in the engine changed
    name: str  # the engine's name in the kernel ("default", or %nbollama load --as NAME); "" outside one
    closed: bool
    kind: EngineKind
    endpoint: str | None  # a remote engine's URL, credentials redacted; None for the local one
    model: ModelSnapshot
    parallel: int  # slots in use now (the adaptive controller moves it)
    parallel_max: int  # slots whose KV is reserved; equals parallel unless adaptive
    reproducible: bool  # batch-invariant decoding (tokens do not depend on what else runs)
    ctx_per_slot: int | None  # None: unknown remotely
    n_batch: int | None  # None: unknown remotely
    gpu_layers: int | None  # None: unknown remotely
    parallel_reason: str  # why parallel is what it is
    amx: str | None  # the AMX guard's decision in one line ("AMX: on: ..."), see nbollama.amx; None remotely
    slots: list[SlotSnapshot]
    queue: QueueSnapshot
    throughput: float  # aggregate generated tokens/s over the window
    throughput_window: float  # seconds
    busy_slots: int
    kv: KVSnapshot
    memory: MemoryFigures
    totals: Totals
    recent: list[CompletedRequest]  # the last few finished requests, oldest first
    prefix_cache: PrefixCacheFigures
    adaptive: AdaptiveFigures | None  # None unless parallel="adaptive"
