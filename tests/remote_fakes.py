"""Small HTTP servers that speak Ollama's, vLLM's and a plain OpenAI-compatible server's documented wire formats.

Ollama and vLLM cannot be installed on the test machine, so their adapters
are tested against these (the protocol tests in ``test_remote_protocol.py``).
Each fake runs ``parallel`` requests at once and queues the rest, streams one
token per ``token_seconds``, and keeps books the tests read: requests seen,
running, the ones whose client went away (a cancel), the bodies sent.

Wire formats, from the projects' docs:

* Ollama: ``GET /api/version``, ``/api/tags``, ``/api/ps``; ``POST /api/generate``
  and ``/api/chat`` stream NDJSON, the last object ``done: true`` with
  ``done_reason``, ``prompt_eval_count``, ``eval_count`` and durations in
  nanoseconds; a full queue answers HTTP 503 ``{"error": "server busy, please
  try again.  maximum pending requests exceeded"}``.
* vLLM: ``GET /v1/models`` (cards with ``max_model_len``), ``/metrics``
  (Prometheus text, ``vllm:`` names), ``/version``; ``POST /v1/completions`` and
  ``/v1/chat/completions`` stream SSE ending in ``data: [DONE]``, usage in a
  last chunk with empty ``choices`` when ``stream_options.include_usage``.
* a plain OpenAI-compatible server: ``/v1/models`` and the two streams, nothing else.
* llama-server (for the wire fields of logprobs and formats; the real one is
  tested in ``test_remote_llama_server.py``): ``GET /props`` (``total_slots``),
  ``POST /completion`` streaming SSE ``{content, tokens, stop,
  tokens_predicted}`` chunks with no ``[DONE]``, the last ``stop: true`` with
  ``stop_type`` and ``timings``; ``/v1/chat/completions`` as OpenAI's.

Log-probabilities come back in each server's shape when asked (``remote_wire``);
``words=`` makes a fake stream given text (a JSON answer, say) and then stop.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import remote_wire

WORDS = ["alpha", " beta", " gamma", " delta", " epsilon", " zeta", " eta", " theta", " iota", " kappa"]
OLLAMA_BUSY = "server busy, please try again.  maximum pending requests exceeded"


@dataclass
class Books:
    """What a fake server saw."""

    requests: list[dict[str, Any]] = field(default_factory=list)  # path, body, headers of each POST
    gets: list[str] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    max_running: int = 0
    max_open: int = 0  # generation requests open at once (running and waiting), the client's in-flight
    started: int = 0
    finished: int = 0
    disconnected: int = 0  # streams the client closed before the end (cancels)
    busy_answers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, fake: Fake) -> None:
        self.fake = fake
        super().__init__(address, handler)


class Fake:
    """One fake server; ``with Fake(kind=...) as fake: fake.url``."""

    def __init__(
        self,
        kind: str,
        *,
        parallel: int = 2,
        token_seconds: float = 0.02,
        tokens: int | None = None,
        prompt_seconds: float = 0.0,
        model: str = "",
        api_key: str | None = None,
        busy_first: int = 0,
        max_queue: int = 512,
        break_after: int | None = None,  # with "BREAK" in the prompt: cut the connection after N tokens
        tls: ssl.SSLContext | None = None,
        version: str | None = None,  # what /api/version (Ollama) or /version (vLLM) says
        words: list[str] | None = None,  # stream these (then stop) instead of WORDS (until max_tokens)
    ) -> None:
        self.kind = kind
        self.parallel = parallel
        self.token_seconds = token_seconds
        self.words = words
        self.tokens = len(words) if words is not None and tokens is None else tokens
        self.version = version or {"ollama": "0.12.6", "vllm": "0.11.0"}.get(kind, "")
        self.prompt_seconds = prompt_seconds
        self.model = model or {"ollama": "llama3.2:latest", "vllm": "Qwen/Qwen3-0.6B", "openai": "gpt-fake", "llama-server": "fake-model"}[kind]
        self.api_key = api_key
        self.busy_first = busy_first
        self.max_queue = max_queue
        self.break_after = break_after  # tokens before the connection is cut (a killed server)
        self.books = Books()
        self.slots = threading.Semaphore(parallel)
        self.loaded = kind != "ollama"  # Ollama loads its model at the first request
        self.stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if isinstance(self._server.socket, ssl.SSLSocket) else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> Fake:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Fake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what /metrics says (vLLM) ---------------------------------------------------------

    def metrics_text(self) -> str:
        b = self.books
        labels = f'engine="0",model_name="{self.model}"'
        return "\n".join(
            [
                "# HELP vllm:num_requests_running Number of requests in model execution batches.",
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{labels}}} {float(b.running)}",
                "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{labels}}} {float(b.waiting)}",
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{{{labels}}} {0.05 * b.running}",
                "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
                "# TYPE vllm:prefix_cache_queries_total counter",
                f"vllm:prefix_cache_queries_total{{{labels}}} {100.0 * b.finished}",
                "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
                "# TYPE vllm:prefix_cache_hits_total counter",
                f"vllm:prefix_cache_hits_total{{{labels}}} {25.0 * b.finished}",
                "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
                "# TYPE vllm:generation_tokens_total counter",
                f"vllm:generation_tokens_total{{{labels}}} {float(b.finished * 8)}",
                "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
                "# TYPE vllm:time_to_first_token_seconds histogram",
                f'vllm:time_to_first_token_seconds_bucket{{{labels},le="0.1"}} {float(b.finished)}',
                f'vllm:time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} {float(b.finished)}',
                f"vllm:time_to_first_token_seconds_count{{{labels}}} {float(b.finished)}",
                f"vllm:time_to_first_token_seconds_sum{{{labels}}} {0.05 * b.finished}",
                "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig",
                "# TYPE vllm:cache_config_info gauge",
                'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
                'gpu_memory_utilization="0.9",num_gpu_blocks="2048",engine="0"} 1.0',
                "",
            ]
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def fake(self) -> Fake:
        return self.server.fake

    # -- plumbing ------------------------------------------------------------------------

    def _json(self, status: int, data: Any) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: int, text: str, content_type: str = "text/plain; version=0.0.4") -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _authorised(self) -> bool:
        key = self.fake.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._json(401, {"error": {"message": "Invalid API key", "type": "invalid_request_error", "code": 401}})
        return False

    # -- GET -------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        fake = self.fake
        with fake.books.lock:
            fake.books.gets.append(self.path)
        path = self.path.split("?", 1)[0]
        if fake.kind == "ollama":
            if path == "/api/version":
                return self._json(200, {"version": fake.version})
            if path == "/api/tags":
                return self._json(200, {"models": [_ollama_model(fake.model, loaded=False)]})
            if path == "/api/ps":
                return self._json(200, {"models": [_ollama_model(fake.model, loaded=True)] if fake.loaded else []})
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": [{"id": fake.model, "object": "model", "owned_by": "library"}]})
            return self._text(404, "404 page not found")
        if not self._authorised():
            return None
        if fake.kind == "llama-server" and path in ("/props", "/health"):
            if path == "/health":
                return self._json(200, {"status": "ok"})
            return self._json(200, {
                "total_slots": fake.parallel,
                "model_path": f"/models/{fake.model}.gguf",
                "build_info": "b9999-fake",
                "default_generation_settings": {"n_ctx": 2048},
                "endpoint_slots": False,
                "endpoint_metrics": False,
            })
        if path == "/v1/models":
            card: dict[str, Any] = {"id": fake.model, "object": "model", "created": 1700000000, "owned_by": "fake"}
            if fake.kind == "vllm":
                card.update(root=fake.model, max_model_len=4096)
            return self._json(200, {"object": "list", "data": [card]})
        if fake.kind == "vllm" and path == "/metrics":
            return self._text(200, fake.metrics_text())
        if fake.kind == "vllm" and path == "/version":
            return self._json(200, {"version": fake.version})
        if fake.kind == "vllm" and path == "/health":
            return self._text(200, "")
        return self._json(404, {"detail": "Not Found"})

    # -- POST ------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        path = self.path.split("?", 1)[0]
        with fake.books.lock:
            fake.books.requests.append({"path": path, "body": body, "headers": dict(self.headers)})
        if fake.kind != "ollama" and not self._authorised():
            return None
        known = {
            "ollama": ("/api/generate", "/api/chat"),
            "vllm": ("/v1/completions", "/v1/chat/completions"),
            "openai": ("/v1/completions", "/v1/chat/completions"),
            "llama-server": ("/completion", "/v1/chat/completions"),
        }[fake.kind]
        if path not in known:
            return self._json(404, {"error": "not found"})
        with fake.books.lock:
            if fake.books.busy_answers < fake.busy_first or fake.books.waiting >= fake.max_queue:
                fake.books.busy_answers += 1
                busy = True
            else:
                busy = False
                fake.books.waiting += 1
                fake.books.max_open = max(fake.books.max_open, fake.books.waiting + fake.books.running)
        if busy:
            if fake.kind == "ollama":
                return self._json(503, {"error": OLLAMA_BUSY})
            return self._json(429, {"error": {"message": "Too many requests", "code": 429}})
        fake.slots.acquire()
        with fake.books.lock:
            fake.books.waiting -= 1
            fake.books.running += 1
            fake.books.started += 1
            fake.books.max_running = max(fake.books.max_running, fake.books.running)
        fake.loaded = True
        try:
            self._generate(path, body)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            with fake.books.lock:
                fake.books.disconnected += 1
        finally:
            with fake.books.lock:
                fake.books.running -= 1
                fake.books.finished += 1
            fake.slots.release()

    def _limit(self, body: dict[str, Any]) -> int:
        if self.fake.kind == "ollama":
            wanted = int((body.get("options") or {}).get("num_predict", 128))
        elif "n_predict" in body:
            wanted = int(body["n_predict"])
        else:
            wanted = int(body.get("max_tokens") or 16)
        return min(wanted, self.fake.tokens) if self.fake.tokens is not None else wanted

    def _generate(self, path: str, body: dict[str, Any]) -> None:
        fake = self.fake
        n = self._limit(body)
        reason = "length" if fake.tokens is None or n < fake.tokens else "stop"
        prompt = body.get("prompt") or " ".join(m.get("content", "") for m in body.get("messages", []))
        prompt_tokens = max(1, len(str(prompt).split()))
        chat = path.endswith("chat") or path.endswith("chat/completions")
        self.send_response(200)
        ndjson = fake.kind == "ollama"
        self.send_header("Content-Type", "application/x-ndjson" if ndjson else "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.flush()
        time.sleep(fake.prompt_seconds)
        started = time.perf_counter()
        model = body.get("model", fake.model)
        words = fake.words or WORDS
        echo = str(prompt) if body.get("echo") else None  # vLLM: the prompt and its logprobs first
        for i in range(n):
            if fake.stopping.is_set():
                return
            if fake.break_after is not None and i >= fake.break_after and "BREAK" in str(prompt):
                self.connection.shutdown(socket.SHUT_RDWR)  # like a killed server: no last chunk
                self.connection.close()
                return
            time.sleep(fake.token_seconds)
            word = words[i % len(words)]
            if ndjson:
                item: dict[str, Any] = {"model": model, "created_at": "2026-01-01T00:00:00Z", "done": False}
                if chat:
                    item["message"] = {"role": "assistant", "content": word}
                else:
                    item["response"] = word
                item.update(remote_wire.ollama(body, i, word))
                self._chunk(json.dumps(item).encode() + b"\n")
            elif path == "/completion":
                data = {"index": 0, "content": word, "tokens": [1000 + i], "stop": False, "id_slot": -1,
                        "tokens_predicted": i + 1, "tokens_evaluated": prompt_tokens}
                data.update(remote_wire.llama_completion(body, i, word))
                self._chunk(b"data: " + json.dumps(data).encode() + b"\n\n")
            else:
                if chat:
                    delta: dict[str, Any] = {"content": word}
                    if i == 0:
                        delta["role"] = "assistant"
                    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
                    choice.update(remote_wire.chat(fake.kind, body, i, word))
                    kind = "chat.completion.chunk"
                else:
                    text = (echo + word) if echo is not None and i == 0 else word
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None}
                    choice.update(remote_wire.legacy(body, i, word, echo_prompt=echo if i == 0 else None))
                    kind = "text_completion"
                if i == n - 1:
                    choice["finish_reason"] = reason
                event = {"id": "cmpl-fake", "object": kind, "created": 1700000000, "model": model, "choices": [choice]}
                self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
        elapsed_ns = int((time.perf_counter() - started) * 1e9)
        if path == "/completion":
            last = {"index": 0, "content": "", "tokens": [], "stop": True, "id_slot": 0, "tokens_predicted": n,
                    "tokens_evaluated": prompt_tokens, "stop_type": "limit" if reason == "length" else "eos",
                    "timings": {"prompt_n": prompt_tokens, "prompt_ms": 2.0, "predicted_n": n,
                                "predicted_ms": elapsed_ns / 1e6, "cache_n": 0}}
            self._chunk(b"data: " + json.dumps(last).encode() + b"\n\n")
        elif ndjson:
            final: dict[str, Any] = {
                "model": model,
                "created_at": "2026-01-01T00:00:01Z",
                "done": True,
                "done_reason": reason,
                "total_duration": elapsed_ns + 1_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": 2_000_000,
                "eval_count": n,
                "eval_duration": elapsed_ns,
            }
            if chat:
                final["message"] = {"role": "assistant", "content": ""}
            else:
                final["response"] = ""
            self._chunk(json.dumps(final).encode() + b"\n")
        else:
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                event = {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model, "choices": [], "usage": usage}
                self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
        self._end_chunks()


def _ollama_model(name: str, *, loaded: bool) -> dict[str, Any]:
    model: dict[str, Any] = {
        "name": name,
        "model": name,
        "size": 3_338_801_804 if loaded else 2_019_393_189,
        "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        },
    }
    if loaded:
        model.update(size_vram=3_338_801_804, context_length=4096, expires_at="2026-01-01T00:05:00Z")
    return model


def self_signed_tls(directory: Any) -> tuple[ssl.SSLContext, str]:
    """A server TLS context for 127.0.0.1 and the CA file a client trusts it with (openssl's CLI)."""
    import subprocess
    from pathlib import Path

    cert = Path(directory) / "cert.pem"
    key = Path(directory) / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return context, str(cert)


@contextmanager
def running(kind: str, **options: Any) -> Iterator[Fake]:
    with Fake(kind, **options) as fake:
        yield fake
