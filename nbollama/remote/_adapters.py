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
kind of server has no word for is refused before anything is sent. The
fields for log-probabilities and output formats, and how they read back, are
``_outputs``'s; what a poll finds is ``_polls``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from .._api.outputs import OutputRequest, TokenLogprob
from .._api.requests import SamplingParams
from .._api.snapshot import RemoteModelFigures
from ..exceptions import InvalidParamsError
from ._detect import ServerInfo
from ._http import error_message, get
from ._metrics import parse_metrics
from ._outputs import check_outputs, output_fields, read_choice, read_entries, read_llama
from ._polls import ServerSlot, ServerState, llama_slots, vllm_state
from ._polls import as_int as _int
from ._polls import as_number as _number

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
    logprobs: list[TokenLogprob | None] | None = None  # the tokens of this item, when asked


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

    def check_outputs(self, params: dict[str, Any]) -> None:
        """Refuse logprobs, prompt logprobs, choices or a format this server cannot give, in one line."""
        check_outputs(self.kind, self.info.version, params)

    def _outputs(self, path: str, sampling: SamplingParams, output: OutputRequest) -> dict[str, Any]:
        return output_fields(self.kind, self.info.version, path, sampling, output)

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
        self,
        prompt: str,
        sampling: SamplingParams,
        given: set[str],
        *,
        chat: bool,
        system: str | None,
        output: OutputRequest = None,
    ) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of one streamed request."""
        body: dict[str, Any] = {
            "model": self.info.model,
            "max_tokens": sampling.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            **self._sampling(sampling, given),
        }
        path = "/v1/chat/completions" if chat else "/v1/completions"
        if chat:
            body["messages"] = self._messages(prompt, system)
        else:
            body["prompt"] = prompt
        return path, {**body, **self._outputs(path, sampling, output)}

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
            event.logprobs = read_choice(choice)
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
        vllm_state(metrics, state, self.info.kv_total)
        return state


class LlamaServerAdapter(Adapter):
    kind = "llama-server"
    supported = frozenset(
        {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop"}
    )
    server_slots = True

    def build(
        self,
        prompt: str,
        sampling: SamplingParams,
        given: set[str],
        *,
        chat: bool,
        system: str | None,
        output: OutputRequest = None,
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
                **self._outputs("/v1/chat/completions", sampling, output),
            }
            return "/v1/chat/completions", body
        return "/completion", {
            "prompt": prompt,
            "n_predict": sampling.max_tokens,
            "stream": True,
            "cache_prompt": True,
            "return_progress": True,
            **options,
            **self._outputs("/completion", sampling, output),
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
        event.logprobs = read_llama(data)
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
                state.slots = llama_slots(response.json())
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


class OllamaAdapter(Adapter):
    kind = "ollama"
    supported = frozenset(
        {"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "stop"}
    )
    ndjson = True
    busy_503 = True

    def build(
        self,
        prompt: str,
        sampling: SamplingParams,
        given: set[str],
        *,
        chat: bool,
        system: str | None,
        output: OutputRequest = None,
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
                **self._outputs("/api/chat", sampling, output),
            }
        return "/api/generate", {
            "model": self.info.model,
            "prompt": prompt,
            "raw": True,  # as written, like the in-kernel engine (no template)
            "stream": True,
            "options": options,
            **self._outputs("/api/generate", sampling, output),
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
        if "logprobs" in data:
            event.logprobs = read_entries(data["logprobs"])
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
