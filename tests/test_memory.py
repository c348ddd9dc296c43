"""Memory figures: NVML through a fake ``pynvml`` module, the host fallback, and the panel that shows them.

The fake module stands in for ``nvidia-ml-py`` in ``sys.modules`` so the
NVML path (GPUs, per-process VRAM, every way NVML fails) runs on machines
without a GPU. ``reset_nvml`` makes ``nbollama.memory`` import it afresh.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from nbollama import memory
from nbollama.memory import (
    format_bytes,
    gpu_figures,
    host_figures,
    memory_figures,
    nvml_error,
    reset_nvml,
)
from nbollama.widgets import MemoryPanel, memory_html, memory_summary

GiB = 1024**3
MiB = 1024**2
KV_ESTIMATE = "4 slots x 512 ctx x 18.0 KiB/token = 36.0 MiB at most"


class FakeNVMLError(Exception):
    """pynvml's ``NVMLError`` stand-in."""


def fake_pynvml(
    *,
    fail_init: bool = False,
    fail_memory_query: bool = False,
    hide_processes: bool = False,
) -> types.ModuleType:
    """Two GPUs: an H100 where this process holds 1.5 GiB (in two contexts) next to a stranger, and an idle A10."""
    pid = os.getpid()
    devices = [
        {
            "name": b"NVIDIA H100 80GB HBM3",  # older nvidia-ml-py returns bytes
            "total": 80 * GiB,
            "used": 20 * GiB,
            "procs": [(pid, 1 * GiB), (pid + 1, 18 * GiB), (pid, 512 * MiB)],
        },
        {"name": "NVIDIA A10", "total": 24 * GiB, "used": 300 * MiB, "procs": [(pid + 2, None)]},
    ]
    module = types.ModuleType("pynvml")
    module.calls = []  # type: ignore[attr-defined]

    def record(name: str) -> None:
        module.calls.append(name)  # type: ignore[attr-defined]

    def nvmlInit() -> None:
        record("init")
        if fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown() -> None:
        record("shutdown")

    def nvmlDeviceGetCount() -> int:
        return len(devices)

    def nvmlDeviceGetHandleByIndex(index: int) -> dict[str, Any]:
        return devices[index]

    def nvmlDeviceGetMemoryInfo(handle: dict[str, Any]) -> SimpleNamespace:
        if fail_memory_query:
            raise FakeNVMLError("GPU is lost")
        return SimpleNamespace(
            total=handle["total"], used=handle["used"], free=handle["total"] - handle["used"]
        )

    def nvmlDeviceGetName(handle: dict[str, Any]) -> bytes | str:
        return handle["name"]

    def nvmlDeviceGetComputeRunningProcesses(handle: dict[str, Any]) -> list[SimpleNamespace]:
        if hide_processes:
            raise FakeNVMLError("Insufficient Permissions")
        return [SimpleNamespace(pid=p, usedGpuMemory=used) for p, used in handle["procs"]]

    for fn in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetName,
        nvmlDeviceGetComputeRunningProcesses,
    ):
        setattr(module, fn.__name__, fn)
    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    return module


@pytest.fixture
def use_pynvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Install a ``pynvml`` (a fake module, or None for 'not installed'); the real one comes back after."""

    def install(module: types.ModuleType | None) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", module)
        reset_nvml()

    yield install
    monkeypatch.undo()
    reset_nvml()


def test_gpus_with_per_process_usage(use_pynvml: Any) -> None:
    fake = fake_pynvml()
    use_pynvml(fake)
    gpus = gpu_figures()
    assert [g["index"] for g in gpus] == [0, 1]
    h100, a10 = gpus
    assert h100["name"] == "NVIDIA H100 80GB HBM3" and a10["name"] == "NVIDIA A10"
    assert (h100["total"], h100["used"], h100["free"]) == (80 * GiB, 20 * GiB, 60 * GiB)
    assert (
        h100["process_used"] == 1 * GiB + 512 * MiB
    )  # both of this process's contexts, not the stranger's
    assert a10["process_used"] == 0  # processes listed, none of them this one
    assert nvml_error() is None
    assert fake.calls.count("init") == 1  # initialised once, then reused

    figures = memory_figures(kv_bytes=36 * MiB, kv_estimate=KV_ESTIMATE)
    assert figures["source"] == "nvml" and figures["gpus"] == gpus
    assert figures["note"] == "VRAM from NVML on 2 GPU(s)"
    assert figures["kv_bytes"] == 36 * MiB and figures["process_rss"] > 0

    panel = MemoryPanel()
    panel.show(figures)
    assert panel.source == "nvml" and len(panel.gpus) == 2 and panel.kv_bytes == 36 * MiB
    page = panel.html
    assert "GPU 0 · NVIDIA H100 80GB HBM3" in page and "GPU 1 · NVIDIA A10" in page
    assert f"{format_bytes(20 * GiB)} / {format_bytes(80 * GiB)} used" in page
    assert f"this process: {format_bytes(1.5 * GiB)}" in page and "this process: 0 B" in page
    assert KV_ESTIMATE in page and "parallel x ctx/slot" in page and format_bytes(36 * MiB) in page
    assert "VRAM from NVML on 2 GPU(s)" in page
    assert "RAM available" not in page  # the host view is for machines without a GPU
    assert memory_summary(figures).startswith(f"VRAM {format_bytes(20 * GiB + 300 * MiB)}/")
    assert f"this process {format_bytes(1.5 * GiB)}" in memory_summary(figures)
    panel.close()

    reset_nvml()
    assert fake.calls[-1] == "shutdown"


def test_driver_hiding_processes(use_pynvml: Any) -> None:
    use_pynvml(fake_pynvml(hide_processes=True))
    gpus = gpu_figures()
    assert len(gpus) == 2 and all(g["process_used"] is None for g in gpus)
    assert gpus[0]["used"] == 20 * GiB  # the device totals still come through
    page = memory_html(memory_figures(kv_bytes=MiB, kv_estimate=KV_ESTIMATE))
    assert page.count("this process: not reported by the driver") == 2


def _assert_host_view(figures: memory.MemoryFigures, reason: str) -> None:
    assert figures["source"] == "host" and figures["gpus"] == []
    assert figures["note"].endswith(": memory is the process's RAM") and reason in figures["note"]
    assert figures["process_rss"] > 0
    panel = MemoryPanel()
    panel.show(figures)
    page = panel.html
    assert panel.source == "host" and panel.gpus == []
    assert "process RSS" in page and format_bytes(figures["process_rss"]) in page
    assert "RAM available" in page and format_bytes(figures["host_total"]) in page
    if figures["process_pss"] is not None:
        assert "process PSS" in page
    assert KV_ESTIMATE in page and "GPU 0" not in page
    assert reason in page  # the note says why there are no VRAM figures
    assert memory_summary(figures).startswith("RSS ")
    panel.close()


def test_nvml_not_installed(use_pynvml: Any) -> None:
    use_pynvml(None)  # ``import pynvml`` raises ImportError
    assert gpu_figures() == []
    assert nvml_error() == "nvidia-ml-py is not installed, so no GPU is read: memory is the process's RAM"
    _assert_host_view(memory_figures(kv_bytes=MiB, kv_estimate=KV_ESTIMATE), "nvidia-ml-py is not installed")


def test_nvml_init_fails(use_pynvml: Any) -> None:
    fake = fake_pynvml(fail_init=True)
    use_pynvml(fake)
    assert gpu_figures() == []
    assert nvml_error() == "an NVIDIA driver is installed but not loaded: memory is the process's RAM"
    gpu_figures()
    assert fake.calls.count("init") == 1  # a failed init is remembered, not retried every snapshot
    _assert_host_view(memory_figures(kv_bytes=MiB, kv_estimate=KV_ESTIMATE), "driver is installed but not loaded")
    reset_nvml()
    assert "shutdown" not in fake.calls  # never initialised, so nothing to shut down


def test_nvml_query_fails(use_pynvml: Any) -> None:
    use_pynvml(fake_pynvml(fail_memory_query=True))
    assert gpu_figures() == []
    assert nvml_error() == "the NVIDIA GPU stopped answering (it may need a reset): memory is the process's RAM"
    _assert_host_view(memory_figures(kv_bytes=MiB, kv_estimate=KV_ESTIMATE), "stopped answering")


def test_host_figures_are_sane_here() -> None:
    host = host_figures()
    rss, pss = host["process_rss"], host["process_pss"]
    total, available = host["host_total"], host["host_available"]
    assert rss is not None and total is not None and available is not None
    assert 10 * MiB < rss < total
    assert 0 < available <= total
    if pss is not None:
        assert 0 < pss <= rss * 1.05  # PSS counts shared pages fractionally, so never much over RSS
    figures = memory_figures()  # whatever NVML does on this machine, no exception
    assert figures["source"] in ("nvml", "host") and figures["note"]
    if figures["source"] == "host":
        assert figures["gpus"] == [] and nvml_error() is not None
    MemoryPanel().show(figures)


@pytest.mark.parametrize(
    ("error", "sentence"),
    [
        ("NVMLError_LibraryNotFound", "no NVIDIA GPU found"),
        ("NVMLError_DriverNotLoaded", "an NVIDIA driver is installed but not loaded"),
        ("NVMLError_NoPermission", "this user may not query the NVIDIA GPU"),
        ("NVMLError_GpuIsLost", "the NVIDIA GPU stopped answering (it may need a reset)"),
        ("NVMLError_LibRmVersionMismatch", "the NVIDIA driver and its library are of different versions"),
        ("NVMLError_NotSupported", "this NVIDIA GPU does not report its memory"),
        ("NVMLError_Unknown", "NVML failed (NVMLError_Unknown: Unknown Error)"),
    ],
)
def test_each_real_nvml_failure_reads_as_a_plain_sentence(error: str, sentence: str) -> None:
    """pynvml's own exception classes (no GPU here to raise them), each as the user reads it."""
    import pynvml

    from nbollama.memory import nvml_sentence

    exc = getattr(pynvml, error)()
    said = nvml_sentence(exc)
    assert said.startswith(sentence) and said.endswith(": memory is the process's RAM")
    assert "NVMLError" not in said or error == "NVMLError_Unknown"
