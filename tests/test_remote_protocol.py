"""Protocol tests: the remote engine against servers that speak Ollama's, vLLM's and OpenAI's wire formats.

Ollama and vLLM cannot be installed here, so ``remote_fakes`` serves their
documented formats (NDJSON streams, ``/api/ps``, ``/metrics`` text, HTTP 503)
on 127.0.0.1. The real llama-server is tested in ``test_remote_llama_server.py``.
Also here, with no server at all: URLs and keys (security), the Prometheus
reader and the sweep's inference rules.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from remote_fakes import OLLAMA_BUSY, Fake, self_signed_tls

import nbollama
from nbollama import session
from nbollama.exceptions import (
    EngineClosedError,
    InvalidParamsError,
    PromptTooLongError,
    QueueFullError,
    RemoteError,
)
from nbollama.magics import StatusReport
from nbollama.remote import RemoteEngine, connect, parse_url, redact_url
from nbollama.remote import _stream as remote_engine_module
from nbollama.remote._bench import (
    ConcurrencyRow,
    find_step,
    infer_parallel,
    recommend_setting,
    server_words,
)
from nbollama.remote._metrics import parse_metrics


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Busy answers are retried with 10 ms waits instead of 0.25 s doubling."""
    monkeypatch.setattr(remote_engine_module, "BUSY_FIRST_WAIT", 0.01)


@pytest.fixture
def ollama() -> Iterator[Fake]:
    with Fake("ollama", parallel=2) as fake:
        yield fake


@pytest.fixture
def vllm() -> Iterator[Fake]:
    with Fake("vllm", parallel=3) as fake:
        yield fake


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- security: URLs and keys -----------------------------------------------------------------


def test_urls_are_checked_and_credentials_redacted() -> None:
    endpoint = parse_url("https://alice:s3cr3t-pass@gpu.example.org:8443/v1?api_key=k-123&x=1")
    assert endpoint.base == "https://gpu.example.org:8443"  # /v1 is nbollama's to add
    assert endpoint.shown == "https://alice:***@gpu.example.org:8443?api_key=***&x=1"
    assert endpoint.auth == ("alice", "s3cr3t-pass")
    assert "s3cr3t" not in repr(endpoint) and "k-123" not in repr(endpoint)
    assert parse_url("localhost:11434").base == "http://localhost:11434"
    assert parse_url("http://[::1]:8000/").base == "http://[::1]:8000"
    for bad, why in [
        ("ftp://host", "scheme must be http or https"),
        ("http://", "no host"),
        ("", "empty"),
        ("http://host:99999", "not a valid URL"),
        ("http://u:topsecret@host/#frag", "fragment"),
    ]:
        with pytest.raises(InvalidParamsError, match=why) as info:
            parse_url(bad)
        assert "topsecret" not in str(info.value)
    text = "failed: http://bob:hunter22@h:1/x?token=abc&q=2 and https://h2/y"
    assert redact_url(text) == "failed: http://bob:***@h:1/x?token=***&q=2 and https://h2/y"


def test_api_key_comes_from_an_environment_variable_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NBOLLAMA_TEST_KEY", raising=False)
    with pytest.raises(InvalidParamsError, match="environment variable NBOLLAMA_TEST_KEY is not set"):
        nbollama.remote.check_connect("http://127.0.0.1:9", api_key_env="NBOLLAMA_TEST_KEY")
    with pytest.raises(InvalidParamsError, match="not an environment variable name"):
        nbollama.remote.check_connect("http://127.0.0.1:9", api_key_env="not a name")
    monkeypatch.setenv("NBOLLAMA_TEST_KEY", "sk-very-secret-value")
    options = nbollama.remote.check_connect("http://127.0.0.1:9", api_key_env="NBOLLAMA_TEST_KEY")
    assert "sk-very-secret" not in repr(options)
    with pytest.raises(TypeError):
        connect("http://127.0.0.1:9", api_key="sk-very-secret-value")  # type: ignore[call-arg]


def test_connection_refused_names_the_url_and_the_reason() -> None:
    url = f"http://user:pw-secret@127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(RemoteError) as info:
        connect(url)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "connection refused" in message and "127.0.0.1" in message
    assert "pw-secret" not in message and info.value.url.startswith("http://user:***@127.0.0.1:")


# -- the Prometheus reader and the sweep's rules ------------------------------------------------


def test_metrics_are_read_with_prometheus_clients_parser() -> None:
    fake = Fake("vllm")
    fake.books.running, fake.books.waiting, fake.books.finished = 3, 2, 4
    metrics = parse_metrics(fake.metrics_text())
    fake.stop()
    assert metrics.total("vllm:num_requests_running") == 3.0
    assert metrics.total("vllm:num_requests_waiting") == 2.0
    assert metrics.total("vllm:prefix_cache_hits_total") == 100.0  # counters keep _total per sample
    assert metrics.total("vllm:time_to_first_token_seconds_count") == 4.0
    assert metrics.labels("vllm:cache_config_info")["num_gpu_blocks"] == "2048"
    assert metrics.total("vllm:nothing") is None and metrics.has_prefix("vllm:")


def _row(concurrency: int, throughput: float, wave: tuple[float, ...], decode: float = 2.0) -> ConcurrencyRow:
    return ConcurrencyRow(
        concurrency=concurrency,
        requests=max(8, concurrency),
        completion_tokens=int(throughput * 10),
        wall_time=10.0,
        throughput=throughput,
        ttft_p50=sorted(wave)[len(wave) // 2],
        ttft_p95=max(wave),
        mean_gen_tps=10.0,
        errors=0,
        first_wave=tuple(sorted(wave)),
        step_after=find_step(wave, decode),
    )


def test_the_ttft_staircase_gives_the_servers_parallelism() -> None:
    assert find_step([0.2, 0.22, 0.25, 0.3], 2.0) is None  # a batched prefill, no queueing
    assert find_step([0.2, 0.21, 2.3, 2.35], 2.0) == 2
    assert find_step([0.2, 0.25, 0.3, 0.31, 1.9, 2.0, 2.1, 2.2], 2.0) == 4
    rows = [
        _row(1, 20.0, (0.2,)),
        _row(2, 38.0, (0.2, 0.21)),
        _row(4, 60.0, (0.2, 0.21, 0.25, 0.3)),
        _row(8, 61.0, (0.2, 0.25, 0.3, 0.31, 1.9, 2.0, 2.1, 2.2)),
    ]
    inferred, how = infer_parallel(rows)
    assert inferred == 4 and "the first 4" in how
    # still climbing when the server ran out of slots: give it more
    recommended, reason = recommend_setting(rows, inferred)
    assert recommended == 8 and "give it 8" in reason
    # flat from 2 on: the smallest value near the best
    flat = [
        _row(1, 20.0, (0.2,)),
        _row(2, 39.0, (0.2, 0.21)),
        _row(4, 40.0, (0.2, 0.21, 0.25, 0.3)),
        _row(8, 40.5, (0.2, 0.25, 0.3, 0.31, 1.9, 2.0, 2.1, 2.2)),
    ]
    assert recommend_setting(flat, 4)[0] == 2
    assert infer_parallel(rows[:3]) == (None, "no step in the first tokens up to 4 requests at once: the server runs at least 4 at once")


def test_the_recommendation_is_said_in_the_servers_words() -> None:
    ollama = server_words("ollama", 4)
    assert ollama.startswith("OLLAMA_NUM_PARALLEL=4") and "systemctl edit ollama.service" in ollama
    assert 'Environment="OLLAMA_NUM_PARALLEL=4"' in ollama
    assert server_words("llama-server", 8, model_path="/m.gguf", ctx=512).startswith("llama-server -m /m.gguf -np 8 -c 4096")
    assert server_words("vllm", 64, model="Qwen/Qwen3-0.6B") == "vllm serve Qwen/Qwen3-0.6B --max-num-seqs 64"
    assert "--max-inflight 3" in server_words("openai", 3)


# -- Ollama --------------------------------------------------------------------------------


def test_ollama_protocol_detection(ollama: Fake, engines: list[RemoteEngine]) -> None:
    engine = connect(ollama.url)
    engines.append(engine)
    info = engine.info
    assert (info.kind, info.model, info.version) == ("ollama", "llama3.2:latest", "0.12.6")
    assert info.parallel is None and "OLLAMA_NUM_PARALLEL" in info.parallel_source
    assert info.ctx is None  # not loaded yet: /api/ps does not list it
    line = engine.summary
    assert line.startswith(f"nbollama: connected to ollama 0.12.6 at {ollama.url} model=llama3.2:latest parallel=unknown")
    assert "max-inflight=4 (default 4: the server does not say how many it runs at once)" in line
    assert ollama.books.requests == []  # detection only reads


def test_ollama_protocol_streams_ndjson(ollama: Fake, engines: list[RemoteEngine]) -> None:
    engine = connect(ollama.url)
    engines.append(engine)
    results = engine.generate(["one two three", "four five"], max_tokens=5, temperature=0.0)
    assert [r.prompt for r in results] == ["one two three", "four five"]
    for result in results:
        assert result.ok and result.finish_reason == "length"
        assert result.text == "alpha beta gamma delta epsilon"
        assert result.completion_tokens == 5 and result.ttft is not None and result.tpot is not None
        assert result.server_timings is not None and result.server_timings["load_ms"] == 1.0
        assert result.server_timings["prompt_ms"] == 2.0  # nanoseconds read as such
    assert [r.prompt_tokens for r in results] == [3, 2]  # prompt_eval_count
    body = ollama.books.requests[0]["body"]
    assert ollama.books.requests[0]["path"] == "/api/generate"
    assert body["raw"] is True and body["stream"] is True and body["model"] == "llama3.2:latest"
    assert body["options"] == {"num_predict": 5, "temperature": 0.0}  # only what was given
    stopped = engine.generate("x", max_tokens=50, stop=["\n"], top_k=3)
    assert stopped[0].text.startswith("alpha")
    assert ollama.books.requests[-1]["body"]["options"] == {"num_predict": 50, "stop": ["\n"], "top_k": 3}


def test_ollama_protocol_chat(ollama: Fake, engines: list[RemoteEngine]) -> None:
    engine = connect(ollama.url)
    engines.append(engine)
    result = engine.generate("Hi", max_tokens=3, chat=True, system="Be brief.")[0]
    assert result.ok and result.text == "alpha beta gamma"
    sent = ollama.books.requests[-1]
    assert sent["path"] == "/api/chat"
    assert sent["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_ollama_protocol_inflight_limit_and_queue(engines: list[RemoteEngine]) -> None:
    with Fake("ollama", parallel=2, token_seconds=0.03) as fake:
        engine = connect(fake.url, max_inflight=3)
        engines.append(engine)
        seen: list[dict[str, Any]] = []
        subscription = engine.subscribe(seen.append, interval=0.05)
        handles = engine.submit_many([f"prompt {i}" for i in range(10)], max_tokens=8)
        wait_for(lambda: any(s["remote"]["in_flight"] == 3 for s in seen), what="3 in flight")
        results = [h.result(timeout=30) for h in handles]
        subscription.close()
    assert all(r.ok for r in results)
    assert fake.books.max_open == 3, "never more than max_inflight connections"
    assert fake.books.max_running == 2
    assert max(s["queue"]["length"] for s in seen) >= 5  # the rest waited in nbollama's queue
    busy = [s for s in seen if s["busy_slots"]]
    assert busy and all(s["remote"]["rows"] == "requests in flight" and s["parallel"] == 3 for s in busy)
    states = {slot["state"] for s in seen for slot in s["slots"]}
    assert {"sent", "generating", "idle"} <= states
    assert sorted({r.slot for r in results}) == [0, 1, 2]  # the lanes


def test_ollama_protocol_ps_in_the_snapshot(ollama: Fake, engines: list[RemoteEngine]) -> None:
    engine = connect(ollama.url)
    engines.append(engine)
    engine.generate("load it", max_tokens=1)
    time.sleep(0.6)
    snap = engine.snapshot()
    json.dumps(snap)  # plain data
    remote = snap["remote"]
    assert remote["models"] == [
        {
            "name": "llama3.2:latest",
            "size": 3_338_801_804,
            "size_vram": 3_338_801_804,
            "context_length": 4096,
            "expires_at": "2026-01-01T00:05:00Z",
        }
    ]
    assert snap["ctx_per_slot"] == 4096
    assert snap["kind"] == "ollama" and snap["endpoint"] == ollama.url
    assert snap["memory"]["source"] == "remote" and snap["memory"]["process_rss"] is None
    assert snap["kv"] == {"used": None, "total": None, "bytes": None}
    assert remote["server_parallel"] is None and remote["server_running"] is None  # Ollama does not say
    report = repr(StatusReport(snap))
    assert "llama3.2:latest: 3.1 GiB (VRAM 3.1 GiB), context 4096" in report
    assert "server: unknown running, unknown waiting" in report


def test_ollama_protocol_busy_is_retried_then_queue_full(
    quick_retries: None, engines: list[RemoteEngine]
) -> None:
    with Fake("ollama", busy_first=2) as fake:
        engine = connect(fake.url)
        engines.append(engine)
        assert engine.generate("x", max_tokens=2)[0].ok  # two 503s, then served
        assert fake.books.busy_answers == 2
    with Fake("ollama", busy_first=10_000) as fake:
        engine = connect(fake.url)
        engines.append(engine)
        handle = engine.submit("x", max_tokens=2)
        result = handle.result(timeout=20)
        assert result.finish_reason == "error"
        assert isinstance(handle.exception(), QueueFullError)
        assert "the server stayed busy after 6 tries" in result.error
        assert " ".join(OLLAMA_BUSY.split()) in result.error  # the server's own words
        assert fake.books.busy_answers == 6


def test_ollama_protocol_cancel_closes_the_stream(engines: list[RemoteEngine]) -> None:
    with Fake("ollama", parallel=1, token_seconds=0.02) as fake:
        engine = connect(fake.url)
        engines.append(engine)
        handle = engine.submit("long", max_tokens=5000)
        wait_for(lambda: handle.completion_tokens >= 3, what="tokens")
        assert handle.cancel()
        result = handle.result(timeout=5)
        assert result.finish_reason == "cancelled" and result.completion_tokens >= 3
        wait_for(lambda: fake.books.disconnected == 1 and fake.books.running == 0, what="the server to see the cancel")
        after = engine.generate("next", max_tokens=2)[0]  # the one slot is free again
        assert after.ok


def test_ollama_protocol_cancel_from_the_panel_by_row(engines: list[RemoteEngine]) -> None:
    with Fake("ollama", parallel=2, token_seconds=0.02) as fake:
        engine = connect(fake.url, max_inflight=2)
        engines.append(engine)
        handles = engine.submit_many(["a", "b", "c"], max_tokens=2000)
        wait_for(lambda: all(h.completion_tokens > 0 for h in handles[:2]), what="two streams")
        lane = handles[1].slot
        assert engine.cancel_slot(lane) == handles[1].id
        assert handles[1].result(timeout=5).finish_reason == "cancelled"
        with pytest.raises(ValueError, match="does not exist"):
            engine.cancel_slot(7)
        assert engine.cancel_all() == 2
        assert all(h.result(timeout=5).finish_reason == "cancelled" for h in handles)
        wait_for(lambda: fake.books.running == 0, what="streams closed")


def test_ollama_protocol_killed_mid_stream_fails_those_requests(engines: list[RemoteEngine]) -> None:
    with Fake("ollama", parallel=4, token_seconds=0.02, break_after=3) as fake:
        engine = connect(fake.url)
        engines.append(engine)
        handles = engine.submit_many(["fine", "BREAK here", "fine too"], max_tokens=10)
        results = [h.result(timeout=20) for h in handles]
    assert results[0].ok and results[2].ok, "the other requests go on"
    broken = results[1]
    assert broken.finish_reason == "error" and broken.completion_tokens == 3
    assert isinstance(handles[1].exception(), RemoteError)
    assert fake.url in broken.error and "closed the connection mid-response" in broken.error


def test_ollama_protocol_server_gone_then_requests_fail_and_views_say_so(
    engines: list[RemoteEngine],
) -> None:
    fake = Fake("ollama").start()
    engine = connect(fake.url)
    engines.append(engine)
    fake.stop()
    started = time.monotonic()
    result = engine.generate("anyone?", max_tokens=3)[0]
    assert time.monotonic() - started < 10, "never hangs"
    assert result.finish_reason == "error" and "connection refused" in result.error
    time.sleep(1.1)
    snap = engine.snapshot()
    assert snap["remote"]["reachable"] is False and "connection refused" in snap["remote"]["error"]
    assert "unreachable at the last look" in repr(StatusReport(snap))


def test_queue_limit_is_all_or_none(monkeypatch: pytest.MonkeyPatch, engines: list[RemoteEngine]) -> None:
    monkeypatch.setenv("NBOLLAMA_MAX_QUEUE", "5")
    with Fake("ollama", parallel=1, token_seconds=0.05) as fake:
        engine = connect(fake.url, max_inflight=1)
        engines.append(engine)
        first = engine.submit_many(["a", "b", "c"], max_tokens=50)
        time.sleep(0.2)
        with pytest.raises(QueueFullError, match="holds 5 requests"):
            engine.submit_many(["d", "e", "f", "g"], max_tokens=5)
        assert engine.snapshot()["queue"]["length"] == 2
        engine.cancel_all()
        assert [h.result(timeout=5).finish_reason for h in first] == ["cancelled"] * 3


# -- vLLM ---------------------------------------------------------------------------------------


def test_vllm_protocol_detection_and_metrics(engines: list[RemoteEngine]) -> None:
    with Fake("vllm", parallel=3, token_seconds=0.06) as vllm:
        _vllm_detection_and_metrics(vllm, engines)


def _vllm_detection_and_metrics(vllm: Fake, engines: list[RemoteEngine]) -> None:
    engine = connect(vllm.url)
    engines.append(engine)
    info = engine.info
    assert (info.kind, info.model, info.ctx, info.version) == ("vllm", "Qwen/Qwen3-0.6B", 4096, "0.11.0")
    assert info.parallel is None and "--max-num-seqs" in info.parallel_source
    assert info.kv_total == 2048 * 16 and info.prefix_cache is True
    assert "ctx=4096 (max_model_len from /v1/models)" in engine.summary
    seen: list[dict[str, Any]] = []
    subscription = engine.subscribe(seen.append, interval=0.05)
    handles = engine.submit_many([f"p{i}" for i in range(5)], max_tokens=20)
    wait_for(lambda: any((s["remote"]["server_running"] or 0) == 3 for s in seen), what="running from /metrics")
    [h.result(timeout=20) for h in handles]
    time.sleep(0.7)
    subscription.close()
    last = engine.snapshot()["remote"]
    assert max(s["remote"]["server_running"] or 0 for s in seen) == 3  # the fake's max-num-seqs
    assert any(s["kv"]["used"] for s in seen) and seen[-1]["kv"]["total"] == 32768
    assert last["prefix_cache_hit_rate"] == 0.25 and last["server_ttft"] == 0.05
    assert last["server_running"] == 0 and last["metrics"] is True


def test_vllm_protocol_streams_sse(vllm: Fake, engines: list[RemoteEngine]) -> None:
    engine = connect(vllm.url)
    engines.append(engine)
    result = engine.generate("a b c d", max_tokens=4, temperature=0.5, top_k=20, repeat_penalty=1.1, seed=7)[0]
    assert result.ok and result.text == "alpha beta gamma delta" and result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens) == (4, 4)  # the usage chunk
    body = vllm.books.requests[-1]["body"]
    assert vllm.books.requests[-1]["path"] == "/v1/completions"
    assert body["stream_options"] == {"include_usage": True}
    assert (body["model"], body["max_tokens"], body["top_k"], body["repetition_penalty"], body["seed"]) == (
        "Qwen/Qwen3-0.6B", 4, 20, 1.1, 7,
    )
    assert "min_p" not in body and "top_p" not in body
    chat = engine.generate("Hi", max_tokens=2, chat=True)[0]
    assert chat.ok and chat.text == "alpha beta"
    assert vllm.books.requests[-1]["path"] == "/v1/chat/completions"
    with pytest.raises(InvalidParamsError, match="repeat_last_n: a vllm server has no such sampling parameter"):
        engine.submit("x", repeat_last_n=32)


def test_vllm_protocol_api_key_from_the_environment_is_sent_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, engines: list[RemoteEngine]
) -> None:
    secret = "sk-remote-test-0123456789"
    caplog.set_level(logging.DEBUG)
    with Fake("vllm", api_key=secret) as fake:
        with pytest.raises(RemoteError, match=r"HTTP 401.*api_key_env"):
            connect(fake.url)
        monkeypatch.setenv("NBOLLAMA_VLLM_KEY", "wrong-key-value")
        with pytest.raises(RemoteError, match="the API key was refused"):
            connect(fake.url, api_key_env="NBOLLAMA_VLLM_KEY")
        monkeypatch.setenv("NBOLLAMA_VLLM_KEY", secret)
        engine = connect(fake.url, api_key_env="NBOLLAMA_VLLM_KEY")
        engines.append(engine)
        result = engine.generate("x", max_tokens=2)[0]
        assert result.ok
        assert fake.books.requests[-1]["headers"]["Authorization"] == f"Bearer {secret}"
        shown = [engine.summary, repr(engine), json.dumps(engine.snapshot()), repr(StatusReport(engine.snapshot()))]
        shown += [record.getMessage() for record in caplog.records]
        assert not [text for text in shown if secret in text]


def test_https_with_a_private_ca(tmp_path: Any, engines: list[RemoteEngine]) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    context, ca = self_signed_tls(tmp_path)
    with Fake("vllm", tls=context) as fake:
        assert fake.url.startswith("https://")
        with pytest.raises(RemoteError, match="TLS failed"):
            connect(fake.url)
        engine = connect(fake.url, ca_bundle=ca)
        engines.append(engine)
        assert engine.generate("x", max_tokens=3)[0].text == "alpha beta gamma"


def test_a_429_is_retried(quick_retries: None, engines: list[RemoteEngine]) -> None:
    with Fake("vllm", busy_first=1) as fake:
        engine = connect(fake.url)
        engines.append(engine)
        assert engine.generate("x", max_tokens=2)[0].ok and fake.books.busy_answers == 1


# -- a plain OpenAI-compatible server ------------------------------------------------------------


def test_openai_protocol(engines: list[RemoteEngine]) -> None:
    with Fake("openai") as fake:
        url = f"http://me:pw-0987654@127.0.0.1:{fake.port}/v1"
        engine = connect(url)
        engines.append(engine)
        assert engine.kind == "openai" and engine.model_name == "gpt-fake"
        assert engine.url == f"http://me:***@127.0.0.1:{fake.port}"
        assert "pw-0987654" not in engine.summary + json.dumps(engine.snapshot())
        assert fake.books.requests == []
        result = engine.generate("hello there", max_tokens=3, temperature=0.2)[0]
        assert result.ok and result.text == "alpha beta gamma"
        body = fake.books.requests[-1]["body"]
        assert body["temperature"] == 0.2 and "top_k" not in body
        assert fake.books.requests[-1]["headers"]["Authorization"].startswith("Basic ")
        with pytest.raises(InvalidParamsError, match="top_k: a openai server has no such sampling parameter"):
            engine.submit("x", top_k=5)
        snap = engine.snapshot()
        assert snap["remote"]["server_parallel"] is None and snap["ctx_per_slot"] is None
        assert "unknown" in repr(StatusReport(snap))


def test_kind_can_be_forced_and_a_wrong_kind_is_named(engines: list[RemoteEngine]) -> None:
    with Fake("vllm") as fake:
        with pytest.raises(RemoteError, match="not a llama-server"):
            connect(fake.url, kind="llama-server")
        with pytest.raises(RemoteError, match="not an Ollama server"):
            connect(fake.url, kind="ollama")
        engine = connect(fake.url, kind="openai")
        engines.append(engine)
        assert engine.kind == "openai"
        with pytest.raises(RemoteError, match="does not serve 'other'"):
            connect(fake.url, model="other")


def test_a_context_error_from_the_server_is_prompt_too_long(engines: list[RemoteEngine]) -> None:
    with Fake("openai") as fake:
        engine = connect(fake.url)
        engines.append(engine)
        original = fake._server.RequestHandlerClass.do_POST

        def refuse(handler: Any) -> None:
            length = int(handler.headers.get("Content-Length") or 0)
            handler.rfile.read(length)
            handler._json(400, {"error": {"message": "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens.", "code": 400}})

        fake._server.RequestHandlerClass.do_POST = refuse  # type: ignore[method-assign]
        try:
            handle = engine.submit("x" * 10, max_tokens=2)
            result = handle.result(timeout=10)
        finally:
            fake._server.RequestHandlerClass.do_POST = original  # type: ignore[method-assign]
        assert result.finish_reason == "error" and isinstance(handle.exception(), PromptTooLongError)
        assert "maximum context length is 4096" in result.error


# -- the session, magics and views on a remote engine -----------------------------------------


def test_session_connect_disconnect_and_a_closed_engine(ollama: Fake) -> None:
    assert session.current_engine() is None
    engine = nbollama.connect(ollama.url)
    try:
        assert session.current_engine() is engine
        assert nbollama.generate(["hi"], max_tokens=2)[0].text == "alpha beta"
        with pytest.raises(RemoteError):
            nbollama.connect(f"http://127.0.0.1:{_free_port()}")
        assert session.current_engine() is engine, "a failed connect keeps the working engine"
    finally:
        assert nbollama.disconnect() is True
    assert engine.closed and session.current_engine() is None
    with pytest.raises(EngineClosedError, match="connect again"):
        engine.submit("x")
    assert [t.name for t in threading.enumerate() if t.name.startswith("nbollama-remote")] == []


def test_views_render_a_remote_snapshot(engines: list[RemoteEngine]) -> None:
    from nbollama.widgets import dashboard

    with Fake("ollama", parallel=1, token_seconds=0.03) as fake:
        engine = connect(fake.url, max_inflight=2)
        engines.append(engine)
        board = dashboard(engine)
        try:
            handles = engine.submit_many(["first", "second", "third"], max_tokens=30)
            wait_for(lambda: any(r.state == "generating" for r in board.slots.rows), what="a generating row")
            wait_for(lambda: any(r.state == "sent" for r in board.slots.rows), what="a sent row")
            labels = {row.label for row in board.slots.rows}
            assert labels == {"lane"} and len(board.slots.rows) == 2
            sent = next(r for r in board.slots.rows if r.state == "sent")
            assert sent.prompt_tokens is None and sent._stats_text().startswith("sent ·")
            assert "ollama" in board._header.value and fake.url in board._header.value
            assert "server parallel <b>unknown</b>" in board._header.value
            assert "this kernel: 2/2 in flight" in board.slots._summary.value
            wait_for(lambda: "llama3.2:latest" in board.memory.html, what="the model's memory")
            assert "VRAM 3.1 GiB (100% on GPU)" in board.memory.html
            [h.result(timeout=20) for h in handles]
        finally:
            board.close()
