"""The AMX guard: a probe in a child process decides, once per machine and build, whether llama.cpp's
AMX path may run. The decision logic is tested with real child processes (one killed by a signal, one
that answers, one that hangs); the real probe runs on this machine's CPU and llama.cpp."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nbollama import amx
from nbollama.exceptions import InvalidParamsError
from nbollama.llama_server import LlamaServer, find_binary

PY = sys.executable


def _child(code: str) -> list[str]:
    return [PY, "-c", code]


def _answer(agreement: float) -> str:
    return f"print({json.dumps(json.dumps({'ok': True, 'amx_buffer': True, 'agreement': agreement}))})"


@pytest.fixture
def fresh_decision(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A decision made anew in this test, cached in an empty folder; forgotten afterwards."""
    monkeypatch.setenv("NBOLLAMA_CACHE", str(tmp_path))
    amx.reset()
    yield tmp_path
    amx.reset()  # the next test's loads decide again, with the environment restored


def test_a_child_killed_by_a_signal_is_unsafe() -> None:
    outcome = amx.run_probe(_child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"))
    assert outcome.safe is False
    assert outcome.detail == "killed by SIGSEGV"


def test_a_child_that_answers_cleanly_is_safe() -> None:
    outcome = amx.run_probe(_child(_answer(0.97)))
    assert outcome.safe is True and outcome.agreement == pytest.approx(0.97)


def test_a_child_that_hangs_is_unsafe_after_the_time_limit() -> None:
    outcome = amx.run_probe(_child("import time; time.sleep(60)"), timeout=1.0)
    assert outcome.safe is False
    assert "no answer within 1 s" in outcome.detail


def test_a_path_that_computes_other_tokens_is_unsafe() -> None:
    outcome = amx.run_probe(_child(_answer(0.25)))
    assert outcome.safe is False and "25%" in outcome.detail


@pytest.mark.parametrize(
    "code", ["raise SystemExit(1)", "print('no json here')", "import sys; sys.exit(0)"]
)
def test_a_probe_that_cannot_run_decides_nothing(code: str) -> None:
    assert amx.run_probe(_child(code)).safe is None


def test_off_from_the_environment_turns_repacking_off(
    fresh_decision: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(amx.AMX_ENV, "off")
    decision = amx.decide()
    assert decision.state == "off" and not decision.use_extra_bufts
    assert decision.line == "AMX: off: NBOLLAMA_AMX=off: weights load without repacking"


def test_a_misspelt_setting_is_refused(fresh_decision: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(amx.AMX_ENV, "yes")
    with pytest.raises(InvalidParamsError, match="NBOLLAMA_AMX='yes': must be on, off or probe"):
        amx.decide()


def _machine_has_amx() -> bool:
    return {"amx_tile", "amx_int8"} <= amx.cpu_flags() and "AMX_INT8 = 1" in amx.llama_system_info()


def test_the_real_probe_decides_once_and_is_remembered(
    fresh_decision: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = amx.decide()
    if not _machine_has_amx():
        assert first.state == "absent" and first.use_extra_bufts
        assert not (fresh_decision / "amx-probe").exists()  # nothing to probe: no child ran
        return
    assert first.source == "probe" and first.state in ("on", "off")
    (stored,) = (fresh_decision / "amx-probe").glob("*.json")
    record = json.loads(stored.read_text())
    assert record["state"] == first.state and record["build"]["cpu"] == amx.cpu_model()
    amx.reset()
    again = amx.decide()
    assert (again.state, again.reason, again.source) == (first.state, first.reason, "cache")
    monkeypatch.setenv(amx.AMX_ENV, "probe")  # probe again, whatever is cached
    amx.reset()
    assert amx.decide().source == "probe"


def test_a_patched_build_keeps_amx_on_this_machine(fresh_decision: Path) -> None:
    """Where setup built llama-cpp-python with nbollama's fix, the probe finds the AMX path safe."""
    from nbollama.build import is_patched

    version = amx._llama_version()
    if not _machine_has_amx() or not is_patched(version):
        pytest.skip(f"needs an AMX CPU and a patched llama-cpp-python (this one: {version})")
    decision = amx.decide()
    assert decision.state == "on", decision.line
    assert "nbollama's AMX fix" in decision.reason


def test_the_load_line_and_the_snapshot_say_what_was_decided(engine: object) -> None:
    line = engine.snapshot()["amx"]  # type: ignore[attr-defined]
    assert line.startswith("AMX: ")
    summary = engine.summary  # type: ignore[attr-defined]
    assert (line in summary) == (not line.startswith("AMX: absent"))


def test_llama_server_skips_repacking_where_the_guard_says_off(
    monkeypatch: pytest.MonkeyPatch, model_path: Path
) -> None:
    binary = find_binary()
    if binary is None:
        pytest.fail("llama-server is not built: scripts/setup.sh --test builds it")
    monkeypatch.setenv(amx.AMX_ENV, "off")
    amx.reset()
    try:
        with LlamaServer(model_path, ["-np", "1", "-c", "256"], binary=binary) as server:
            assert server.process is not None
            assert "--no-repack" in server.process.args  # type: ignore[operator]
            answer = httpx.post(f"{server.url}/completion", json={"prompt": "Hello", "n_predict": 2}, timeout=60)
            assert answer.status_code == 200 and answer.json()["tokens_predicted"] >= 1
    finally:
        amx.reset()


def test_the_machine_report_that_ci_prints_is_clean() -> None:
    """``python -m nbollama.amx`` (what .ci/run prints first): the CPU, llama.cpp's features, the decision."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([PY, "-m", "nbollama.amx"], capture_output=True, text=True, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("cpu: ") and lines[-1].startswith("AMX: ") and "llama-cpp-python" in lines[2]
    assert "Warning" not in done.stderr, done.stderr
