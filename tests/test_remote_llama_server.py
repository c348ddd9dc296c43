"""The remote engine against a real llama-server: the bundled model, 4 slots, /metrics on, 127.0.0.1.

llama-server is built from llama-cpp-python's own sources by
``python -m nbollama.llama_server build`` (``scripts/setup.sh --test`` does it
once; the binary is cached in ``~/.cache/nbollama``). Without it these tests
fail with that instruction rather than skip: they are the proof that the
remote engine works on a real server.
"""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import nbollama
from nbollama import session
from nbollama.exceptions import RemoteError
from nbollama.llama_server import LlamaServer, find_binary
from nbollama.magics import StatusReport
from nbollama.remote import RemoteEngine, connect
from nbollama.remote._bench import RemoteSweepResult, remote_sweep
from nbollama.results import Results

SERVER_ARGS = ["-np", "4", "--metrics", "-c", "2048"]
#: llama.cpp's OpenMP threads sleep instead of spinning while they wait: on a busy 2-core CI machine,
#: spinning threads that get descheduled make a decode step take seconds instead of milliseconds
SERVER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
SIX_PROMPTS = [
    "The capital of France is",
    "Count from 1 to 10: 1, 2,",
    "Once upon a time",
    "The opposite of hot is",
    "List three colours:",
    "A haiku about rain:",
]


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _require_binary() -> None:
    if find_binary() is None:
        pytest.fail(
            "llama-server is not built for this llama-cpp-python: run `python -m nbollama.llama_server build` "
            "once (about 8 minutes; scripts/setup.sh --test does it)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[LlamaServer]:
    _require_binary()
    with LlamaServer(model_path, SERVER_ARGS, env=SERVER_ENV) as running:
        yield running


@pytest.fixture
def engine(server: LlamaServer) -> Iterator[RemoteEngine]:
    remote = connect(server.url)
    yield remote
    remote.close()
    wait_for(lambda: not _busy_slots(server.url), timeout=30, what="the server's slots to free")


def _slots(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/slots", timeout=5).json()


def _busy_slots(url: str) -> list[int]:
    return [s["id"] for s in _slots(url) if s.get("is_processing")]


@pytest.fixture(scope="module")
def shell() -> Iterator[InteractiveShell]:
    """conftest's shell, but unloading closes the engine a test connected (conftest's keeps it)."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbollama")
    yield ip
    ip.run_line_magic("unload_ext", "nbollama")


def test_detects_llama_server(engine: RemoteEngine, server: LlamaServer) -> None:
    info = engine.info
    assert info.kind == "llama-server"
    assert info.parallel == 4 and info.ctx == 512  # -c 2048 split over 4 slots
    assert info.model == "gemma-3-270m-q4_k_m" and info.model_path.endswith(".gguf")
    assert info.metrics_endpoint and info.slots_endpoint and info.host_is_local
    assert engine.max_inflight == 4
    assert engine.summary.startswith(
        f"nbollama: connected to llama-server at {server.url} model=gemma-3-270m-q4_k_m "
        "parallel=4 (total_slots from /props, llama-server -np) ctx/slot=512"
    )


def test_a_six_prompt_generate_cell_streams_and_returns_results_in_order(
    shell: InteractiveShell, shown: list[dict[str, Any]], server: LlamaServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_line_magic("nbollama", f"connect {server.url}")
    try:
        assert "nbollama: connected to llama-server" in capsys.readouterr().out
        engine = session.current_engine()
        assert isinstance(engine, RemoteEngine)
        results = shell.run_cell_magic(
            "generate", "--max-tokens 24 --temperature 0 --out remote_answers", "\n---\n".join(SIX_PROMPTS)
        )
        assert isinstance(results, Results) and shell.user_ns["remote_answers"] is results
        assert [r.prompt for r in results] == SIX_PROMPTS
        assert all(r.ok and r.text and r.completion_tokens > 0 for r in results), results
        assert all(r.ttft is not None and r.server_timings and r.server_timings["predicted_tokens"] == r.completion_tokens for r in results)
        assert {r.slot for r in results} <= {0, 1, 2, 3}
        assert len(shown) >= 3, "the cell's display was updated while it streamed"
        assert any("generating" in out["data"]["text/plain"] for out in shown[1:-1])
        report = shell.run_line_magic("nbollama", "status")
        assert isinstance(report, StatusReport) and "remote engine (llama-server)" in repr(report)
        # (no claim that a rerun gives the same texts: the server's batches, and so its numerics,
        # depend on timing and on its prompt cache)
    finally:
        shell.run_line_magic("nbollama", "disconnect")
    assert "disconnected from llama-server" in capsys.readouterr().out
    assert session.current_engine() is None


def test_the_snapshot_shows_the_servers_four_slots_changing_state(engine: RemoteEngine) -> None:
    seen: list[dict[str, Any]] = []
    subscription = engine.subscribe(seen.append, interval=0.1)
    try:
        results = engine.generate([f"{p} " for p in SIX_PROMPTS] * 2, max_tokens=16, temperature=0.0)
        time.sleep(0.8)
    finally:
        subscription.close()
    assert all(r.ok for r in results)
    assert seen and all(len(s["slots"]) == 4 and s["remote"]["rows"] == "server slots" for s in seen)
    for slot_id in range(4):
        states = {s["slots"][slot_id]["state"] for s in seen}
        assert {"generating", "idle"} <= states, (slot_id, states)
    ours = [slot for s in seen for slot in s["slots"] if slot["state"] == "generating"]
    assert ours and all(slot["origin"] == "this kernel" and slot["request_id"] is not None for slot in ours)
    assert max(s["busy_slots"] for s in seen) == 4
    assert max(s["remote"]["server_running"] or 0 for s in seen) >= 3  # /metrics
    assert any(s["queue"]["length"] > 0 for s in seen)  # 12 prompts, 4 in flight


def test_logprobs_and_a_json_schema_on_the_real_server(engine: RemoteEngine) -> None:
    """n_probs comes back as OpenAI-shaped logprobs (greedy: each token is its top alternative),
    and a json_schema output parses."""
    result = engine.generate("The capital of France is", max_tokens=6, temperature=0.0, logprobs=3)[0]
    assert result.ok and result.logprobs is not None and len(result.logprobs) == result.completion_tokens
    assert "".join(t["token"] for t in result.logprobs) == result.text
    for token in result.logprobs:
        top = token["top_logprobs"]
        assert len(top) == 3 and token["id"] >= 0 and token["logprob"] < 0
        assert (top[0]["id"], top[0]["token"]) == (token["id"], token["token"])
        assert top[0]["logprob"] == pytest.approx(token["logprob"])
        assert [a["logprob"] for a in top] == sorted((a["logprob"] for a in top), reverse=True)
    assert result.perplexity is not None and result.perplexity >= 1
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
    }
    person = engine.generate("A person as JSON:", max_tokens=64, temperature=0.0, json_schema=schema)[0]
    assert person.finish_reason == "stop" and person.parse_error is None, person
    assert isinstance(person.parsed, dict) and {"name", "age"} <= set(person.parsed)
    assert isinstance(person.parsed["age"], int) and 0 <= person.parsed["age"] <= 150


def test_a_cancel_frees_the_servers_slot(engine: RemoteEngine, server: LlamaServer) -> None:
    handle = engine.submit("Write a very long story about a lighthouse keeper.", max_tokens=400)
    wait_for(lambda: handle.completion_tokens >= 3, what="tokens")
    assert len(_busy_slots(server.url)) == 1
    assert handle.cancel()
    result = handle.result(timeout=10)
    assert result.finish_reason == "cancelled" and 3 <= result.completion_tokens < 400
    wait_for(lambda: not _busy_slots(server.url), timeout=15, what="/slots to show the slot free")


def test_ctrl_c_in_a_cell_cancels_the_remote_requests(
    shell: InteractiveShell, shown: list[dict[str, Any]], server: LlamaServer
) -> None:
    shell.run_line_magic("nbollama", f"connect {server.url}")
    try:
        engine = session.current_engine()
        assert isinstance(engine, RemoteEngine)

        def interrupt_when_streaming() -> None:
            wait_for(lambda: engine.snapshot()["totals"]["generated_tokens"] > 0 or any(
                s["decoded_tokens"] > 0 for s in engine.snapshot()["slots"] if s["state"] != "idle"
            ), what="streaming")
            _thread.interrupt_main()

        threading.Thread(target=interrupt_when_streaming, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            shell.run_cell_magic("generate", "--max-tokens 300 --out partial", "Tell a long story.\n---\nAnother long story.")
        assert [r.finish_reason for r in shell.user_ns["partial"]] == ["cancelled", "cancelled"]
        wait_for(lambda: not _busy_slots(server.url), timeout=15, what="the slots to free")
    finally:
        shell.run_line_magic("nbollama", "disconnect")


def test_another_clients_request_shows_up_as_another_client(engine: RemoteEngine, server: LlamaServer) -> None:
    other_started = threading.Event()
    stop = threading.Event()

    def other_client() -> None:
        with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{server.url}/completion", json={"prompt": "Tell me about the sea", "n_predict": 300, "stream": True}
        ) as response:
            for _ in response.iter_lines():
                other_started.set()
                if stop.is_set():
                    return

    thread = threading.Thread(target=other_client, daemon=True)
    thread.start()
    try:
        assert other_started.wait(60)
        mine = engine.submit("My own request:", max_tokens=40)
        wait_for(lambda: mine.completion_tokens > 2, what="our tokens")
        time.sleep(0.6)
        snap = engine.snapshot()
        busy = [s for s in snap["slots"] if s["state"] != "idle"]
        origins = sorted(s["origin"] for s in busy)
        assert origins == ["another client", "this kernel"], busy
        theirs = next(s for s in busy if s["origin"] == "another client")
        assert theirs["request_id"] is None and theirs["prompt_preview"] == "" and theirs["max_tokens"] == 300
        assert "another client" in repr(StatusReport(snap))
        with pytest.raises(ValueError, match="another client's request"):
            engine.cancel_slot(theirs["id"])
        ours = next(s for s in busy if s["origin"] == "this kernel")
        assert ours["request_id"] == mine.id and ours["prompt_preview"] == "My own request:"
        assert mine.result(timeout=60).ok
    finally:
        stop.set()
        thread.join(30)


def test_killing_the_server_mid_generation_gives_clear_errors_and_a_live_kernel(model_path: Path) -> None:
    _require_binary()
    doomed = LlamaServer(model_path, SERVER_ARGS, env=SERVER_ENV).start()
    try:
        engine = connect(doomed.url)
        seen: list[dict[str, Any]] = []
        subscription = engine.subscribe(seen.append, interval=0.1)
        handles = engine.submit_many([f"Story number {i}:" for i in range(6)], max_tokens=300)
        wait_for(lambda: sum(h.completion_tokens > 0 for h in handles) >= 2, what="streams")
        doomed.kill()
        started = time.monotonic()
        results = [h.result(timeout=60) for h in handles]
        assert time.monotonic() - started < 30, "the kernel never hangs on a dead server"
        assert all(r.finish_reason == "error" for r in results), [r.finish_reason for r in results]
        for handle, result in zip(handles, results):
            assert isinstance(handle.exception(), RemoteError)
            assert doomed.url in result.error
        reasons = " ".join(r.error or "" for r in results)
        assert "closed the connection mid-response" in reasons or "connection refused" in reasons
        wait_for(lambda: seen and seen[-1]["remote"]["reachable"] is False, timeout=15, what="the views to say so")
        assert "connection refused" in seen[-1]["remote"]["error"]
        subscription.close()
        late = engine.generate("still there?", max_tokens=2)[0]
        assert late.finish_reason == "error" and "connection refused" in late.error
        assert engine.snapshot()["closed"] is False  # the engine is alive, the server is not
        engine.close()
    finally:
        doomed.stop()


def test_bench_against_the_server_infers_its_slots_and_recommends(
    engine: RemoteEngine, shell: InteractiveShell, server: LlamaServer
) -> None:
    result = remote_sweep(engine, concurrency=(1, 2, 4, 8), n_prompts=8, max_tokens=24, progress=False)
    assert [r.concurrency for r in result.rows] == [1, 2, 4, 8]
    assert all(r.throughput > 0 and r.ttft_p50 > 0 and r.errors == 0 for r in result.rows)
    assert result.inferred_parallel == 4, (result.inference, [r.first_wave for r in result.rows])
    assert result.setting.startswith("llama-server -m ") and f"-np {result.recommended}" in result.setting
    assert result.recommended in (2, 4, 8)
    assert engine.max_inflight == 4, "the sweep puts the in-flight limit back"
    html = result._repr_html_()
    assert "The server runs 4 at once" in html and "-np" in html
    # the magic on the kernel's remote engine
    shell.run_line_magic("nbollama", f"connect {server.url}")
    try:
        with pytest.raises(UsageError, match="--ctx is the server's own setting"):
            shell.run_line_magic("nbollama", "bench --ctx 256")
        swept = shell.run_line_magic("nbollama", "bench --concurrency 1,2 --prompts 2 --max-tokens 4")
        assert isinstance(swept, RemoteSweepResult) and [r.concurrency for r in swept.rows] == [1, 2]
    finally:
        shell.run_line_magic("nbollama", "disconnect")


def test_load_switches_back_to_the_in_kernel_engine(
    shell: InteractiveShell, server: LlamaServer, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_line_magic("nbollama", f"connect {server.url} --max-inflight 2")
    remote = session.current_engine()
    assert isinstance(remote, RemoteEngine) and remote.max_inflight == 2
    shell.run_line_magic("nbollama", "load --parallel 2 --ctx 256")
    try:
        local = session.current_engine()
        assert remote.closed and isinstance(local, nbollama.Engine)
        assert "nbollama: model=" in capsys.readouterr().out
    finally:
        shell.run_line_magic("nbollama", "unload")
