"""Memory figures for the engine and its views, and the ``parallel="auto"`` rule.

With a GPU the figures come from NVML (``pynvml``, package ``nvidia-ml-py``);
without one, or when NVML is missing or fails in any way, they come from the
host: this process's RSS and PSS and the available RAM. Nothing here raises
because a driver is absent: a notebook on a laptop must still show something.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from ._api.snapshot import GPUFigures, MemoryFigures
from .exceptions import InvalidParamsError

__all__ = [
    "AUTO_PARALLEL",
    "ParallelChoice",
    "gpu_figures",
    "host_figures",
    "nvml_error",
    "nvml_sentence",
    "reset_nvml",
    "memory_figures",
    "choose_parallel",
    "slots_within",
    "free_memory",
    "kv_per_slot",
    "format_bytes",
]

#: What ``parallel="auto"`` picks when that many slots fit (Ollama's original rule).
AUTO_PARALLEL = 4

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"initialised": False, "error": None}


def format_bytes(n: float | None) -> str:
    """``1536 -> '1.5 KiB'``; for one-line summaries."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None (the reason kept for the note)."""
    with _nvml_lock:
        if _nvml_state["initialised"]:
            return _nvml_state["module"]
        if _nvml_state["error"] is not None:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors...
            _nvml_state["error"] = nvml_sentence(exc)
            return None
        _nvml_state.update(initialised=True, module=pynvml)
        return pynvml


#: What each NVML failure means to a user, found by pynvml's class name or its message.
_NVML_SENTENCES = (
    (("LibraryNotFound", "Shared Library Not Found"), "no NVIDIA GPU found"),
    (("DriverNotLoaded", "Driver Not Loaded"), "an NVIDIA driver is installed but not loaded"),
    (("NoPermission", "Insufficient Permissions"), "this user may not query the NVIDIA GPU"),
    (("GpuIsLost", "GPU is lost"), "the NVIDIA GPU stopped answering (it may need a reset)"),
    (("LibRmVersionMismatch", "version mismatch"),
     "the NVIDIA driver and its library are of different versions (a reboot after a driver update fixes it)"),
    (("NotSupported", "Not Supported"), "this NVIDIA GPU does not report its memory"),
)


def nvml_sentence(exc: BaseException) -> str:
    """A plain sentence for an NVML failure, ending with where the figures come from instead."""
    name, text = type(exc).__name__, str(exc)
    if isinstance(exc, ImportError):
        why = "nvidia-ml-py is not installed, so no GPU is read"
    else:
        why = next(
            (sentence for marks, sentence in _NVML_SENTENCES if any(m in name or m in text for m in marks)),
            f"NVML failed ({name}: {text})",
        )
    return f"{why}: memory is the process's RAM"


def reset_nvml() -> None:
    """Forget NVML's state so the next call tries again (tests swap the module)."""
    with _nvml_lock:
        module = _nvml_state.get("module")
        if _nvml_state["initialised"] and module is not None:
            try:
                module.nvmlShutdown()
            except Exception:
                pass
        _nvml_state.clear()
        _nvml_state.update(initialised=False, error=None)


def nvml_error() -> str | None:
    """Why NVML is not in use, if it is not."""
    _nvml()
    error: str | None = _nvml_state["error"]
    return error


def gpu_figures() -> list[GPUFigures]:
    """Per-GPU totals from NVML; empty when there is no GPU or NVML fails."""
    nvml = _nvml()
    if nvml is None:
        return []
    pid = os.getpid()
    try:
        out: list[GPUFigures] = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            process_used: int | None = None
            try:
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid and proc.usedGpuMemory is not None:
                        process_used = (process_used or 0) + int(proc.usedGpuMemory)
                if process_used is None:
                    process_used = 0
            except Exception:
                process_used = None  # some drivers (and containers) hide processes
            out.append(
                GPUFigures(
                    index=index,
                    name=str(name),
                    total=int(info.total),
                    used=int(info.used),
                    free=int(info.free),
                    process_used=process_used,
                )
            )
        return out
    except Exception as exc:
        with _nvml_lock:
            _nvml_state["error"] = nvml_sentence(exc)
        return []


_PSS_TTL = 2.0  # reading smaps_rollup costs ~5 ms: most of a snapshot's cost
_pss_cache: tuple[float, int | None] = (-_PSS_TTL, None)


def _pss(*, fresh: bool = False) -> int | None:
    """Proportional set size: counts the shared, mmapped model file once per sharer.

    Cached for two seconds, because views ask several times a second.
    """
    global _pss_cache
    now = time.monotonic()
    if not fresh and now - _pss_cache[0] < _PSS_TTL:
        return _pss_cache[1]
    value: int | None = None
    try:
        with open(f"/proc/{os.getpid()}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    value = int(line.split()[1]) * 1024
                    break
    except OSError:
        value = None
    _pss_cache = (now, value)
    return value


def host_figures(*, fresh: bool = False) -> dict[str, int | None]:
    """This process's RSS and PSS and the host's RAM; ``fresh`` skips the PSS cache."""
    vm = psutil.virtual_memory()
    return {
        "process_rss": int(psutil.Process().memory_info().rss),
        "process_pss": _pss(fresh=fresh),
        "host_total": int(vm.total),
        "host_available": int(vm.available),
    }


def memory_figures(kv_bytes: int = 0, kv_estimate: str = "", kv_type: str = "") -> MemoryFigures:
    """Everything a memory view shows, from NVML when a GPU answers, else the host."""
    gpus = gpu_figures()
    host = host_figures()
    if gpus:
        note = f"VRAM from NVML on {len(gpus)} GPU(s)"
    else:
        note = nvml_error() or "no GPU found: memory is the process's RAM"
    return MemoryFigures(
        source="nvml" if gpus else "host",
        process_rss=int(host["process_rss"] or 0),
        process_pss=host["process_pss"],
        host_total=int(host["host_total"] or 0),
        host_available=int(host["host_available"] or 0),
        gpus=gpus,
        kv_bytes=int(kv_bytes),
        kv_estimate=kv_estimate,
        kv_type=kv_type,
        note=note,
    )


@dataclass(frozen=True)
class ParallelChoice:
    """The effective parallel value and the sentence that explains it."""

    parallel: int
    reason: str


def free_memory(on_gpu: bool) -> tuple[int, str]:
    """The memory slots would come out of, and its name for the reason."""
    if on_gpu:
        gpus = gpu_figures()
        if gpus:
            return max(g["free"] for g in gpus), "free VRAM"
        return int(psutil.virtual_memory().available), "available RAM (no GPU answered NVML)"
    return int(psutil.virtual_memory().available), "available RAM"


def slots_within(budget: int, per_slot_bytes: int) -> int:
    """How many slots of ``per_slot_bytes`` a KV budget of ``budget`` bytes holds."""
    if per_slot_bytes <= 0:
        raise InvalidParamsError(f"per-slot KV bytes must be > 0, got {per_slot_bytes}")
    return max(0, int(budget) // int(per_slot_bytes))


def choose_parallel(
    per_slot_bytes: int,
    shared_bytes: int,
    *,
    on_gpu: bool,
    env_value: str | None = None,
    most: int = AUTO_PARALLEL,
    kv_type: str = "f16",
) -> ParallelChoice:
    """Ollama's original rule, by slot: ``most`` slots if their KV and buffers fit in free memory, else fewer.

    ``per_slot_bytes`` is one slot's KV cache in ``kv_type``, ``shared_bytes``
    the compute and output buffers that exist once whatever the slot count.
    ``env_value`` is ``NBOLLAMA_NUM_PARALLEL``, which wins when set.
    """
    if env_value:
        try:
            forced = int(env_value)
        except ValueError:
            raise InvalidParamsError(
                f"NBOLLAMA_NUM_PARALLEL={env_value!r} is not a whole number"
            ) from None
        if forced < 1:
            raise InvalidParamsError(f"NBOLLAMA_NUM_PARALLEL={forced} must be at least 1")
        return ParallelChoice(forced, f"NBOLLAMA_NUM_PARALLEL={forced}")
    free, where = free_memory(on_gpu)
    need = most * per_slot_bytes + shared_bytes
    each = f"{format_bytes(per_slot_bytes)} of {kv_type} KV each"
    if need <= free:
        return ParallelChoice(
            most, f"auto: {most} slots ({each}) need {format_bytes(need)}, {where} is {format_bytes(free)}"
        )
    fit = max(1, min(most, slots_within(max(0, free - shared_bytes), per_slot_bytes)))
    return ParallelChoice(
        fit,
        f"auto: {most} slots ({each}) would need {format_bytes(need)} but {where} is only "
        f"{format_bytes(free)}, so {fit}",
    )


class _KVSized(Protocol):
    def kv_bytes_per_slot(
        self, kv_type: str | None = None, kv_type_v: str | None = None, *, ctx: int | None = None
    ) -> int: ...


def kv_per_slot(
    engine: object, kv_types: Sequence[str] = ("f16", "q8_0", "q4_0"), *, ctx: int | None = None
) -> dict[str, int]:
    """Each KV type's bytes per slot for an in-kernel engine's model, as llama.cpp allocates them.

    Measured by a small probe context per type (cached), so it knows block
    sizes and padding; ``ctx`` defaults to the engine's context per slot.
    """
    if not hasattr(engine, "kv_bytes_per_slot"):
        raise InvalidParamsError(
            "KV bytes per type need an in-kernel engine: a server sets its KV cache type where it starts"
        )
    sized: _KVSized = engine  # checked just above
    return {kv_type: sized.kv_bytes_per_slot(kv_type, ctx=ctx) for kv_type in kv_types}
