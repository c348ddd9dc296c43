"""What kind of server is at a URL, found from its own endpoints.

* llama-server: ``GET /props`` answers with ``total_slots`` (its ``-np``);
* Ollama: ``GET /api/version``, then ``/api/ps`` (loaded models) and
  ``/api/tags`` (installed ones);
* vLLM: ``GET /metrics`` with ``vllm:`` names, or ``/v1/models`` cards with
  ``max_model_len``;
* anything else answering ``GET /v1/models``: a plain OpenAI-compatible server.

The ``ServerInfo`` says what was found and where each figure came from, and
says "unknown" where the server does not tell (Ollama's parallel, vLLM's
``--max-num-seqs``) instead of guessing.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from ..exceptions import InvalidParamsError, RemoteError
from ._http import Connection, error_message, get
from ._metrics import Metrics, parse_metrics
from ._url import host_is_local

__all__ = ["KINDS", "ServerInfo", "detect"]

#: The kinds ``connect(kind=...)`` accepts; "auto" detects.
KINDS = ("auto", "llama-server", "ollama", "vllm", "openai")

_OLLAMA_OVERRIDES = (
    "/etc/systemd/system/ollama.service.d",
    "/etc/systemd/system/ollama.service",
)
_NUM_PARALLEL = re.compile(r"OLLAMA_NUM_PARALLEL\s*=\s*\"?(\d+)")


@dataclass(frozen=True)
class ServerInfo:
    """A detected server: its kind, model, parallel and context, each with where it came from."""

    kind: str
    url: str  # redacted
    model: str
    model_path: str = ""
    model_size: int | None = None  # bytes of the model file, when the server says
    model_params: int | None = None
    model_family: str = ""
    model_digest: str = ""  # Ollama's: the sha256 of the model's blob
    parallel: int | None = None  # the server's own: total_slots, OLLAMA_NUM_PARALLEL, --max-num-seqs
    parallel_source: str = ""
    ctx: int | None = None  # context per request (llama-server: per slot)
    ctx_source: str = ""
    version: str | None = None
    slots_endpoint: bool = False
    metrics_endpoint: bool = False
    prefix_cache: bool | None = None
    kv_total: int | None = None  # tokens of KV cache the server has (vLLM: blocks x block size)
    host_is_local: bool = False
    models_available: tuple[str, ...] = ()
    found: tuple[str, ...] = field(default=())  # which endpoint told what

    def describe_parallel(self) -> str:
        value = "unknown" if self.parallel is None else str(self.parallel)
        return f"{value} ({self.parallel_source})" if self.parallel_source else value

    def describe_ctx(self) -> str:
        value = "unknown" if self.ctx is None else str(self.ctx)
        return f"{value} ({self.ctx_source})" if self.ctx_source else value


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _error(connection: Connection, response: httpx.Response) -> str:
    """The server's error text, with any of the connection's secrets it echoes redacted."""
    return connection.scrub(error_message(response))


def _reach(connection: Connection, client: httpx.Client, path: str) -> httpx.Response:
    """GET ``path``; a connection failure is a RemoteError naming the URL and the reason."""
    try:
        return get(client, path)
    except httpx.HTTPError as exc:
        raise RemoteError(connection.url, connection.describe(exc)) from None


def _unauthorised(connection: Connection, response: httpx.Response) -> RemoteError:
    hint = (
        "the API key was refused"
        if connection.api_key
        else "it wants an API key: connect with api_key_env='VAR' (--api-key-env VAR)"
    )
    return RemoteError(connection.url, f"{_error(connection, response)} ({hint})")


def _check_auth(connection: Connection, response: httpx.Response) -> None:
    if response.status_code in (401, 403):
        raise _unauthorised(connection, response)


# -- llama-server ----------------------------------------------------------------------------


def _llama_server(connection: Connection, client: httpx.Client, model: str | None) -> ServerInfo | None:
    response = _reach(connection, client, "/props")
    _check_auth(connection, response)
    if response.status_code == 503:
        raise RemoteError(connection.url, f"llama-server is not ready yet ({_error(connection, response)}); try again shortly")
    props = _json(response) if response.status_code == 200 else None
    if not isinstance(props, dict) or "total_slots" not in props:
        return None
    settings = props.get("default_generation_settings") or {}
    path = str(props.get("model_path") or "")
    alias = str(props.get("model_alias") or "")
    name = Path(path).name if not alias or alias == path else alias
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE) or "llama-server model"
    size = params = None
    with contextlib.suppress(httpx.HTTPError):
        cards = _json(get(client, "/v1/models"))
        for card in (cards or {}).get("data", []) if isinstance(cards, dict) else []:
            meta = card.get("meta") or {}
            size = meta.get("size") if isinstance(meta.get("size"), int) else None
            params = meta.get("n_params") if isinstance(meta.get("n_params"), int) else None
            break
    ctx = settings.get("n_ctx") if isinstance(settings.get("n_ctx"), int) else None
    slots = props.get("endpoint_slots")
    metrics = props.get("endpoint_metrics")
    return ServerInfo(
        kind="llama-server",
        url=connection.url,
        model=model or name,
        model_path=path,
        model_size=size,
        model_params=params,
        parallel=int(props["total_slots"]),
        parallel_source="total_slots from /props, llama-server -np",
        ctx=ctx,
        ctx_source="per slot, n_ctx from /props" if ctx is not None else "",
        version=str(props.get("build_info") or "") or None,
        slots_endpoint=True if slots is None else bool(slots),
        metrics_endpoint=bool(metrics),
        prefix_cache=True,  # nbollama sends cache_prompt=true
        found=("/props: llama-server",),
    )


# -- Ollama ----------------------------------------------------------------------------------


def _ollama_parallel_here() -> tuple[int | None, str]:
    """OLLAMA_NUM_PARALLEL of an ``ollama`` server on this machine, from its environment or systemd."""
    try:
        import psutil

        for process in psutil.process_iter(["name", "cmdline"]):
            name = (process.info.get("name") or "").lower()
            cmdline = process.info.get("cmdline") or []
            if name != "ollama" and not (cmdline and Path(cmdline[0]).name == "ollama"):
                continue
            if "serve" not in cmdline and name == "ollama" and len(cmdline) > 1:
                continue
            try:
                environment = process.environ()
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            value = environment.get("OLLAMA_NUM_PARALLEL")
            if value and value.strip().isdigit():
                return int(value), f"OLLAMA_NUM_PARALLEL={value} in the environment of ollama (pid {process.pid})"
            return None, (
                f"OLLAMA_NUM_PARALLEL is not set for ollama (pid {process.pid}): Ollama's default applies "
                "(1 since mid-2025); %nbollama bench measures it"
            )
    except Exception:
        pass
    for place in _OLLAMA_OVERRIDES:
        path = Path(place)
        files = sorted(path.glob("*.conf")) if path.is_dir() else ([path] if path.is_file() else [])
        for file in files:
            with contextlib.suppress(OSError):
                match = _NUM_PARALLEL.search(file.read_text(errors="replace"))
                if match:
                    return int(match.group(1)), f"OLLAMA_NUM_PARALLEL={match.group(1)} in {file}"
    return None, ""


def _ollama(
    connection: Connection, client: httpx.Client, model: str | None, *, local: bool
) -> ServerInfo | None:
    response = _reach(connection, client, "/api/version")
    _check_auth(connection, response)
    data = _json(response) if response.status_code == 200 else None
    if not isinstance(data, dict) or "version" not in data:
        return None
    version = str(data["version"])
    loaded: list[dict[str, Any]] = []
    installed: list[str] = []
    sizes: dict[str, int] = {}  # bytes of each installed model's files
    digests: dict[str, str] = {}
    with contextlib.suppress(httpx.HTTPError):
        ps = _json(get(client, "/api/ps"))
        loaded = [m for m in (ps or {}).get("models", []) if isinstance(m, dict)] if isinstance(ps, dict) else []
    with contextlib.suppress(httpx.HTTPError):
        tags = _json(get(client, "/api/tags"))
        for entry in (tags or {}).get("models", []) if isinstance(tags, dict) else []:
            if isinstance(entry, dict) and (entry.get("name") or entry.get("model")):
                name = str(entry.get("name") or entry.get("model"))
                installed.append(name)
                if isinstance(entry.get("size"), int):
                    sizes[name] = entry["size"]
                if isinstance(entry.get("digest"), str):
                    digests[name] = entry["digest"]
    loaded_names = [str(m.get("name") or m.get("model")) for m in loaded]
    if model is None:
        if len(loaded_names) == 1:
            model = loaded_names[0]
        elif len(installed) == 1:
            model = installed[0]
        else:
            choices = ", ".join(installed or loaded_names) or "none installed (ollama pull NAME)"
            raise RemoteError(
                connection.url,
                f"Ollama {version} has several models or none loaded; pick one with model='NAME' "
                f"(--model NAME). Installed: {choices}",
            )
    elif installed and model not in installed and f"{model}:latest" not in installed:
        raise RemoteError(
            connection.url,
            f"Ollama has no model {model!r} (ollama pull {model}); installed: {', '.join(installed)}",
        )
    entry = next(
        (m for m in loaded if m.get("name") in (model, f"{model}:latest") or m.get("model") in (model, f"{model}:latest")),
        None,
    )
    ctx = entry.get("context_length") if entry and isinstance(entry.get("context_length"), int) else None
    details = (entry or {}).get("details") or {}
    parallel, source = _ollama_parallel_here() if local else (None, "")
    if not source:
        source = (
            "Ollama does not report OLLAMA_NUM_PARALLEL (its default is 1 since mid-2025); "
            "%nbollama bench measures it"
        )
    return ServerInfo(
        kind="ollama",
        url=connection.url,
        model=model,
        model_size=sizes.get(model, sizes.get(f"{model}:latest")),
        model_family=str(details.get("family") or ""),
        model_digest=digests.get(model, digests.get(f"{model}:latest", str((entry or {}).get("digest") or ""))),
        parallel=parallel,
        parallel_source=source,
        ctx=ctx,
        ctx_source="context_length from /api/ps" if ctx is not None else "known once the model is loaded (/api/ps)",
        version=version,
        models_available=tuple(installed),
        found=("/api/version: Ollama",),
    )


# -- vLLM and plain OpenAI-compatible servers ------------------------------------------------


def _metrics_page(client: httpx.Client) -> Metrics | None:
    try:
        response = get(client, "/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return parse_metrics(response.text)
    except Exception:
        return None


def _models(connection: Connection, client: httpx.Client) -> tuple[list[dict[str, Any]], httpx.Response]:
    response = _reach(connection, client, "/v1/models")
    _check_auth(connection, response)
    data = _json(response) if response.status_code == 200 else None
    cards = data.get("data") if isinstance(data, dict) else None
    return ([c for c in cards if isinstance(c, dict)] if isinstance(cards, list) else []), response


def _pick_model(connection: Connection, cards: list[dict[str, Any]], model: str | None, what: str) -> str:
    ids = [str(c.get("id")) for c in cards if c.get("id")]
    if model is not None:
        if ids and model not in ids:
            raise RemoteError(connection.url, f"{what} does not serve {model!r}; it serves: {', '.join(ids)}")
        return model
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise RemoteError(connection.url, f"{what} lists no model at /v1/models; name one with model='NAME' (--model NAME)")
    raise RemoteError(connection.url, f"{what} serves several models; pick one with model='NAME' (--model NAME): {', '.join(ids)}")


def _vllm(
    connection: Connection, client: httpx.Client, model: str | None, *, forced: bool
) -> ServerInfo | None:
    metrics = _metrics_page(client)
    by_metrics = metrics is not None and metrics.has_prefix("vllm:")
    cards, response = _models(connection, client)
    by_cards = any("max_model_len" in c for c in cards)
    if not (by_metrics or by_cards or forced):
        return None
    if response.status_code != 200 and not forced:
        return None
    name = _pick_model(connection, cards, model, "vLLM")
    card = next((c for c in cards if c.get("id") == name), cards[0] if cards else {})
    ctx = card.get("max_model_len") if isinstance(card.get("max_model_len"), int) else None
    version = None
    with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
        version = str(get(client, "/version").json().get("version")) or None
    kv_total = prefix = None
    if metrics is not None:
        info = metrics.labels("vllm:cache_config_info")
        if info:
            with contextlib.suppress(ValueError, TypeError):
                kv_total = int(float(info["num_gpu_blocks"])) * int(float(info["block_size"]))
            if "enable_prefix_caching" in info:
                prefix = info["enable_prefix_caching"].lower() == "true"
    found = []
    if by_metrics:
        found.append("/metrics: vllm: names")
    if by_cards:
        found.append("/v1/models: max_model_len")
    return ServerInfo(
        kind="vllm",
        url=connection.url,
        model=name,
        parallel=None,
        parallel_source="vLLM does not report --max-num-seqs (its default is 256); %nbollama bench measures what it runs at once",
        ctx=ctx,
        ctx_source="max_model_len from /v1/models" if ctx is not None else "",
        version=version,
        metrics_endpoint=by_metrics,
        prefix_cache=prefix,
        kv_total=kv_total,
        models_available=tuple(str(c.get("id")) for c in cards if c.get("id")),
        found=tuple(found) or ("kind given: vllm",),
    )


def _openai(
    connection: Connection, client: httpx.Client, model: str | None, *, forced: bool
) -> ServerInfo | None:
    cards, response = _models(connection, client)
    if response.status_code != 200 and not (forced and model):
        if forced:
            raise RemoteError(connection.url, f"GET /v1/models: {_error(connection, response)}; name the model with model='NAME'")
        return None
    name = _pick_model(connection, cards, model, "the server")
    return ServerInfo(
        kind="openai",
        url=connection.url,
        model=name,
        parallel=None,
        parallel_source="an OpenAI-compatible server does not say how many requests it runs at once; %nbollama bench measures it",
        ctx=None,
        ctx_source="not reported by the server",
        models_available=tuple(str(c.get("id")) for c in cards if c.get("id")),
        found=("/v1/models: OpenAI-compatible",),
    )


# -- detection -------------------------------------------------------------------------------


def detect(
    connection: Connection,
    *,
    kind: str = "auto",
    model: str | None = None,
    client: httpx.Client | None = None,
) -> ServerInfo:
    """Find what serves at the connection's URL; raises ``RemoteError`` naming the URL and the reason."""
    if kind not in KINDS:
        raise InvalidParamsError(f"kind={kind!r}: one of {', '.join(KINDS)}")
    own = client is None
    client = client or connection.sync_client()
    local = host_is_local(connection.endpoint.host)
    try:
        info: ServerInfo | None = None
        if kind in ("auto", "llama-server"):
            info = _llama_server(connection, client, model)
            if info is None and kind == "llama-server":
                raise RemoteError(connection.url, "not a llama-server: GET /props has no total_slots")
        if info is None and kind in ("auto", "ollama"):
            info = _ollama(connection, client, model, local=local)
            if info is None and kind == "ollama":
                raise RemoteError(connection.url, "not an Ollama server: GET /api/version did not answer with a version")
        if info is None and kind in ("auto", "vllm"):
            info = _vllm(connection, client, model, forced=kind == "vllm")
        if info is None and kind in ("auto", "openai"):
            info = _openai(connection, client, model, forced=kind == "openai")
        if info is None:
            raise RemoteError(
                connection.url,
                "no LLM server found: neither /props (llama-server), /api/version (Ollama), "
                "/metrics with vllm: names (vLLM) nor /v1/models (OpenAI-compatible) answered",
            )
        return replace(info, host_is_local=local)
    finally:
        if own:
            client.close()
