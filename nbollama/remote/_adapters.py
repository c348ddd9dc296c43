"""One adapter per kind of server: how a request is written, how its stream reads, how its state is polled.

Streams, each server's native one:

* llama-server: ``POST /completion`` (SSE, no ``[DONE]``; ``tokens_predicted``
  in every chunk, ``timings`` and ``id_slot`` in the last; with
  ``return_progress`` a chunk when the slot starts reading the prompt);
* Ollama: ``POST /api/generate`` with ``raw`` (NDJSON; durations in
  nanoseconds in the last object);
* vLLM and OpenAI-compatible servers: ``POST /v1/completions`` (SSE ending in
  ``[DONE]``, usage in a last chunk when asked with ``stream_options``).

Chat mode uses ``/v1/chat/completions`` (``/api/chat`` on Ollama). Only the
sampling parameters a caller gave are sent (plus ``max_tokens``, always), so
the server's and the model's own defaults hold for the rest; a parameter the
kind of server has no word for is refused before anything is sent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from .._api.requests import SamplingParams
from .._api.snapshot import RemoteModelFigures
from ..exceptions import InvalidParamsError
from ._detect import ServerInfo
from ._http import error_message, get
from ._metrics import Metrics, parse_metrics

__all__ = ["Event", "ServerSlot", "ServerState", "Adapter", "adapter_for"]


@dataclass
class Event:
    """One item of a stream, in nbollama's words."""

    text: str = ""
    tokens: int | None = None  # completion tokens so far, when the server counts them
    new_tokens: int = 0  # tokens in this item, when it does not
    prompt_tokens: int | None = None
    started: bool = False  # the server began reading the prompt (a slot took the request)
    finish: str | None = None  # "stop" or "length", from the server's own reason
    timings: dict[str, float] | None = None
    cached_tokens: int | None = None
    slot: int | None = None
    error: str | None = None  # an error the server reported inside the stream
    final: bool = False  # nothing more will come for this request


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


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class Adapter:
    """The requests, streams and polls of one kind of server."""

    kind: ClassVar[str] = "openai"
    #: sampling parameters this kind of server takes (``max_tokens`` always goes)
    supported: ClassVar[frozenset[str]] = frozenset({"temperature", "top_p", "seed", "stop"})
    #: the server shows its own slots (rows of the views are server slots)
    server_slots: ClassVar[bool] = False
    #: the stream's format
    ndjson: ClassVar[bool] = False
    #: HTTP 503 means "busy, try again" (retried with backoff)
    busy_503: ClassVar[bool] = False

    def __init__(self, info: ServerInfo) -> None:
        self.info = info

    # -- requests --------------------------------------------------------------------------

    def check(self, given: set[str]) -> None:
        """Refuse sampling parameters this server has no word for, before anything is sent."""
        unsupported = sorted(given - self.supported - {"max_tokens"})
        if unsupported:
            raise InvalidParamsError(
                f"{', '.join(unsupported)}: a {self.kind} server has no such sampling parameter "
                f"(it takes {', '.join(sorted(self.supported | {'max_tokens'}))}); "
                "leave it out, or connect with the server's own kind if it is llama-server or vLLM"
            )

    def _sampling(self, sampling: SamplingParams, given: set[str]) -> dict[str, Any]:
        names = {
            "temperature": "temperature",
            "top_p": "top_p",
            "seed": "seed",
            "stop": "stop",
            "top_k": "top_k",
            "min_p": "min_p",
            "repeat_penalty": "repetition_penalty",
        }
        body: dict[str, Any] = {}
        for name in sorted(given & self.supported):
            value = getattr(sampling, name)
            if name == "stop":
                value = list(value)
                if not value:
                    continue
            if value is None:
                continue
            body[names.get(name, name)] = value
        return body

    @staticmethod
    def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]

    def build(
        self, prompt: str, sampling: SamplingParams, given: set[str], *, chat: bool, system: str | None
    ) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of one streamed request."""
        body: dict[str, Any] = {
            "model": self.info.model,
            "max_tokens": sampling.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._sampling(sampling, given),
        }
        if chat:
            body["messages"] = self._messages(prompt, system)
            return "/v1/chat/completions", body
        body["prompt"] = prompt
        return "/v1/completions", body

    # -- streams ---------------------------------------------------------------------------

    def parse(self, data: Any) -> Event:
        """One SSE ``data`` (or NDJSON line) as an Event (OpenAI's chunk format here)."""
        if not isinstance(data, dict):
            return Event()
        if "error" in data:
            error = data["error"]
            return Event(error=str(error.get("message") if isinstance(error, dict) else error), final=True)
        event = Event()
        choices = data.get("choices") or []
        if choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            text = choice.get("text") if "text" in choice else (delta or {}).get("content")
            if isinstance(text, str) and text:
                event.text = text
                event.new_tokens = 1
            reason = choice.get("finish_reason")
            if reason:
                event.finish = "length" if reason == "length" else "stop"
        usage = data.get("usage")
        if isinstance(usage, dict):
            event.tokens = _int(usage.get("completion_tokens"))
            event.prompt_tokens = _int(usage.get("prompt_tokens"))
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                event.cached_tokens = _int(details.get("cached_tokens"))
        timings = data.get("timings")
        if isinstance(timings, dict):
            event.timings = _llama_timings(timings)
            event.cached_tokens = _int(timings.get("cache_n"))
        if "prompt_progress" in data:
            event.started = True
        return event

    # -- state -----------------------------------------------------------------------------

    def poll(self, client: httpx.Client) -> ServerState:
        """One look at the server's state (nothing to look at for a plain OpenAI server)."""
        return ServerState()


def _llama_timings(timings: dict[str, Any]) -> dict[str, float]:
    keep = {
        "prompt_n": "prompt_tokens",
        "prompt_ms": "prompt_ms",
        "predicted_n": "predicted_tokens",
        "predicted_ms": "predicted_ms",
        "predicted_per_second": "predicted_per_second",
        "prompt_per_second": "prompt_per_second",
        "cache_n": "cached_tokens",
    }
    return {ours: float(timings[theirs]) for theirs, ours in keep.items() if _number(timings.get(theirs)) is not None}


class VLLMAdapter(Adapter):
    kind = "vllm"
    supported = frozenset({"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "stop"})

    def poll(self, client: httpx.Client) -> ServerState:
        response = get(client, "/metrics")
        response.raise_for_status()
        metrics = parse_metrics(response.text)
        state = ServerState(metrics=True)
        _vllm_state(metrics, state, self.info.kv_total)
        return state


def _vllm_state(metrics: Metrics, state: ServerState, kv_total: int | None) -> None:
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


class LlamaServerAdapter(Adapter):
    kind = "llama-server"
    supported = frozenset(
        {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop"}
    )
    server_slots = True

    def build(
        self, prompt: str, sampling: SamplingParams, given: set[str], *, chat: bool, system: str | None
    ) -> tuple[str, dict[str, Any]]:
        options: dict[str, Any] = {}
        for name in sorted(given & self.supported):
            value = getattr(sampling, name)
            if name == "stop":
                value = list(value)
            if value is not None and value != []:
                options[name] = value
        if chat:
            body: dict[str, Any] = {
                "model": self.info.model,
                "messages": self._messages(prompt, system),
                "max_tokens": sampling.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
                "cache_prompt": True,
                "return_progress": True,
                **options,
            }
            return "/v1/chat/completions", body
        return "/completion", {
            "prompt": prompt,
            "n_predict": sampling.max_tokens,
            "stream": True,
            "cache_prompt": True,
            "return_progress": True,
            **options,
        }

    def parse(self, data: Any) -> Event:
        if isinstance(data, dict) and "choices" in data:
            return super().parse(data)  # chat, through the OpenAI-compatible endpoint
        if not isinstance(data, dict):
            return Event()
        if "error" in data:
            error = data["error"]
            return Event(error=str(error.get("message") if isinstance(error, dict) else error), final=True)
        event = Event(prompt_tokens=_int(data.get("tokens_evaluated")))
        progress = data.get("prompt_progress")
        if isinstance(progress, dict):
            event.started = True
            event.prompt_tokens = _int(progress.get("total")) or event.prompt_tokens
            event.cached_tokens = _int(progress.get("cache"))
            return event
        content = data.get("content")
        if isinstance(content, str):
            event.text = content
        event.tokens = _int(data.get("tokens_predicted"))
        if event.tokens is None and data.get("tokens"):
            event.new_tokens = len(data["tokens"]) if isinstance(data["tokens"], list) else 1
        if data.get("stop"):
            event.final = True
            event.finish = "length" if data.get("stop_type") == "limit" else "stop"
            timings = data.get("timings")
            if isinstance(timings, dict):
                event.timings = _llama_timings(timings)
                event.cached_tokens = _int(timings.get("cache_n"))
            slot = _int(data.get("id_slot"))
            event.slot = slot if slot is not None and slot >= 0 else None
        return event

    def poll(self, client: httpx.Client) -> ServerState:
        state = ServerState()
        if self.info.slots_endpoint:
            response = get(client, "/slots")
            if response.status_code == 501:
                state.slots_note = "/slots is off on this server (llama-server --no-slots)"
            elif response.status_code != 200:
                state.slots_note = f"/slots: {error_message(response)}"
            else:
                state.slots = _llama_slots(response.json())
        else:
            state.slots_note = "/slots is off on this server (llama-server --no-slots)"
        if self.info.metrics_endpoint:
            response = get(client, "/metrics")
            if response.status_code == 200:
                metrics = parse_metrics(response.text)
                state.metrics = True
                running = metrics.total("llamacpp:requests_processing")
                deferred = metrics.total("llamacpp:requests_deferred")
                state.running = None if running is None else int(running)
                state.waiting = None if deferred is None else int(deferred)
                state.generated_total = metrics.total("llamacpp:tokens_predicted_total")
        return state


def _llama_slots(data: Any) -> list[ServerSlot]:
    slots: list[ServerSlot] = []
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict) or _int(item.get("id")) is None:
            continue
        nxt = item.get("next_token")
        if isinstance(nxt, list):  # an object in the README, a one-element array in newer builds
            nxt = nxt[0] if nxt else {}
        nxt = nxt if isinstance(nxt, dict) else {}
        params = item.get("params")
        params = params if isinstance(params, dict) else {}
        n_predict = _int(params.get("n_predict"))
        if n_predict is None:
            n_predict = _int(params.get("max_tokens"))
        processing = bool(item.get("is_processing", item.get("state", 0) != 0))
        decoded = (_int(nxt.get("n_decoded")) or 0) if processing else 0
        prompt = _int(item.get("n_prompt_tokens")) if processing else None
        processed = _int(item.get("n_prompt_tokens_processed")) if processing else None
        cached = _int(item.get("n_prompt_tokens_cache")) if processing else None
        if decoded > 0 and processed is not None:
            # generating: the prompt is read in full; n_prompt_tokens also counts the tokens
            # generated so far in current builds, so the prompt is what was processed or cached
            prompt = processed + (cached or 0)
        slots.append(
            ServerSlot(
                id=int(item["id"]),
                processing=processing,
                task=_int(item.get("id_task")) if processing else None,
                n_ctx=_int(item.get("n_ctx")),
                prompt_tokens=prompt,
                prompt_processed=processed,
                prompt_cached=cached,
                decoded=decoded,
                max_tokens=n_predict if n_predict is not None and n_predict > 0 else None,
            )
        )
    return sorted(slots, key=lambda s: s.id)


class OllamaAdapter(Adapter):
    kind = "ollama"
    supported = frozenset(
        {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop"}
    )
    ndjson = True
    busy_503 = True

    def build(
        self, prompt: str, sampling: SamplingParams, given: set[str], *, chat: bool, system: str | None
    ) -> tuple[str, dict[str, Any]]:
        options: dict[str, Any] = {"num_predict": sampling.max_tokens}
        for name in sorted(given & self.supported):
            value = getattr(sampling, name)
            if name == "stop":
                value = list(value)
            if value is not None and value != []:
                options[name] = value
        if chat:
            return "/api/chat", {
                "model": self.info.model,
                "messages": self._messages(prompt, system),
                "stream": True,
                "options": options,
            }
        return "/api/generate", {
            "model": self.info.model,
            "prompt": prompt,
            "raw": True,  # as written, like the in-kernel engine (no template)
            "stream": True,
            "options": options,
        }

    def parse(self, data: Any) -> Event:
        if not isinstance(data, dict):
            return Event()
        if "error" in data:
            return Event(error=str(data["error"]), final=True)
        message = data.get("message")
        text = data.get("response") if "response" in data else (message or {}).get("content", "")
        event = Event(text=text if isinstance(text, str) else "")
        if event.text:
            event.new_tokens = 1  # Ollama streams one token per object
        if data.get("done"):
            event.final = True
            event.finish = "length" if data.get("done_reason") == "length" else "stop"
            event.tokens = _int(data.get("eval_count"))
            event.prompt_tokens = _int(data.get("prompt_eval_count"))
            timings: dict[str, float] = {}
            for theirs, ours in (
                ("prompt_eval_duration", "prompt_ms"),
                ("eval_duration", "predicted_ms"),
                ("load_duration", "load_ms"),
                ("total_duration", "total_ms"),
            ):
                value = _number(data.get(theirs))
                if value is not None:
                    timings[ours] = value / 1e6  # nanoseconds
            if event.prompt_tokens is not None:
                timings["prompt_tokens"] = float(event.prompt_tokens)
            if event.tokens is not None:
                timings["predicted_tokens"] = float(event.tokens)
                if timings.get("predicted_ms"):
                    timings["predicted_per_second"] = event.tokens / (timings["predicted_ms"] / 1000)
            event.timings = timings or None
        return event

    def poll(self, client: httpx.Client) -> ServerState:
        response = get(client, "/api/ps")
        response.raise_for_status()
        data = response.json()
        state = ServerState()
        for model in data.get("models", []) if isinstance(data, dict) else []:
            if not isinstance(model, dict):
                continue
            state.models.append(
                RemoteModelFigures(
                    name=str(model.get("name") or model.get("model") or ""),
                    size=_int(model.get("size")),
                    size_vram=_int(model.get("size_vram")),
                    context_length=_int(model.get("context_length")),
                    expires_at=str(model["expires_at"]) if model.get("expires_at") else None,
                )
            )
        return state


_ADAPTERS: dict[str, type[Adapter]] = {
    "llama-server": LlamaServerAdapter,
    "ollama": OllamaAdapter,
    "vllm": VLLMAdapter,
    "openai": Adapter,
}


def adapter_for(info: ServerInfo) -> Adapter:
    return _ADAPTERS[info.kind](info)
