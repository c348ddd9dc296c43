"""Whether llama.cpp's AMX path may run on this machine: found out once, in a child process.

On Sapphire-Rapids-class Xeons a llama.cpp built with ``-march=native`` repacks
weights into its AMX buffer, and in some builds the first batch then dies with
SIGSEGV (llama.cpp #20824). A segfault cannot be caught: it takes the kernel
with it. So before the first model loads, a child process loads the bundled
model on the AMX path and decodes real batches (``_amx_probe.py``). A child
killed by a signal, or silent past a time limit, means unsafe, and every load
in this process then skips the extra buffers (``use_extra_bufts=False``,
llama-server's ``--no-repack``). The answer is kept under
``$NBOLLAMA_CACHE/amx-probe/``, keyed by the CPU and the llama.cpp build, so
it costs a few seconds once per machine and build.

``NBOLLAMA_AMX=on`` uses the AMX path without a probe, ``off`` never uses it,
``probe`` probes again. ``python -m nbollama.amx`` prints the CPU's flags,
llama.cpp's system info and the decision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .exceptions import InvalidParamsError, ModelError
from .models import cache_dir, default_model_path

__all__ = [
    "AMX_ENV",
    "AMXDecision",
    "ProbeOutcome",
    "cpu_flags",
    "cpu_model",
    "llama_system_info",
    "build_fingerprint",
    "decide",
    "run_probe",
    "reset",
]

AMX_ENV = "NBOLLAMA_AMX"
#: A probe loads a 270M model twice and decodes three batches: seconds. Past this, it hangs.
PROBE_TIMEOUT = 120.0
_ISSUE = "llama.cpp #20824"
_FIX = "`python -m nbollama.build` builds llama-cpp-python with the fix, and keeps the AMX speed"
_MIN_AGREEMENT = 0.8  # top-1 agreement with the plain path below this: the AMX path computes nonsense

State = Literal["on", "off", "absent"]


@dataclass(frozen=True)
class AMXDecision:
    """What this process does about the AMX path, and why, in words a user can act on."""

    state: State  # "absent": the CPU or this llama.cpp build has no AMX
    reason: str
    source: Literal["probe", "cache", "env", "machine"]

    @property
    def use_extra_bufts(self) -> bool:
        """llama.cpp's ``use_extra_bufts`` (repacked weights: AMX, CPU_REPACK) for every load."""
        return self.state != "off"

    @property
    def line(self) -> str:
        """One line for the load line, ``%nbollama status`` and the snapshot."""
        return f"AMX: {self.state}: {self.reason}"


@dataclass(frozen=True)
class ProbeOutcome:
    """How a probe process ended: ``safe`` is None when the probe itself could not run."""

    safe: bool | None
    detail: str
    agreement: float | None = None


def cpu_flags() -> set[str]:
    """The CPU's flags, from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def llama_system_info() -> str:
    """``llama_print_system_info()``: the CPU features this llama.cpp build uses."""
    import llama_cpp

    raw = llama_cpp.llama_print_system_info()
    return (raw or b"").decode(errors="replace").strip()


def _llama_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("llama-cpp-python")


@functools.lru_cache(maxsize=1)
def build_fingerprint() -> dict[str, str]:
    """What identifies this llama.cpp build on this CPU: its version, features, and the bytes of
    its libraries (the result store's keys use it too)."""
    import llama_cpp

    digest = hashlib.sha256()
    lib = Path(llama_cpp.__file__).parent / "lib"
    for path in sorted(lib.glob("*.so*")) + sorted(lib.glob("*.dylib")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return {
        "llama_cpp_python": _llama_version(),
        "system_info": llama_system_info(),
        "libraries": digest.hexdigest(),
        "cpu": cpu_model(),
        "cpu_amx": " ".join(sorted(f for f in cpu_flags() if f.startswith("amx"))),
    }


def run_probe(command: Sequence[str], *, timeout: float = PROBE_TIMEOUT) -> ProbeOutcome:
    """Run one probe process; killed by a signal or past ``timeout`` means unsafe.

    A clean exit is safe when the last line of its output is the probe's JSON
    with ``ok`` and a top-1 ``agreement`` with the plain path of at least 0.8.
    Any other exit is the probe failing (no model, a Python error): ``safe=None``.
    """
    try:
        done = subprocess.run(
            list(command), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return ProbeOutcome(False, f"no answer within {timeout:.0f} s")
    except OSError as exc:
        return ProbeOutcome(None, f"could not start: {exc}")
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        return ProbeOutcome(False, f"killed by {name}")
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return ProbeOutcome(None, f"exited with {done.returncode}: {tail[0][:200]}")
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        answer: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        answer = {}
    if not answer.get("ok"):
        return ProbeOutcome(None, "exited cleanly without an answer")
    agreement = float(answer.get("agreement", 0.0))
    if agreement < _MIN_AGREEMENT:
        return ProbeOutcome(
            False, f"ran, but its top-1 tokens agree with the plain path on {agreement:.0%} only", agreement
        )
    return ProbeOutcome(True, f"top-1 tokens agree with the plain path on {agreement:.0%}", agreement)


def _probe_command() -> list[str]:
    model = default_model_path()  # the bundled model: always installed, q4_K, q6_K and q8_0 tensors
    threads = max(1, os.cpu_count() or 1)  # as many as an engine uses: worker threads matter here
    return [sys.executable, str(Path(__file__).with_name("_amx_probe.py")), str(model), str(threads)]


def _store() -> Path:
    return cache_dir() / "amx-probe"


def _cache_path(fingerprint: dict[str, str]) -> Path:
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:32]
    return _store() / f"{key}.json"


def _read_cached(path: Path) -> AMXDecision | None:
    try:
        data = json.loads(path.read_text())
        if data.get("state") in ("on", "off"):
            return AMXDecision(data["state"], str(data["reason"]), "cache")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_cached(path: Path, decision: AMXDecision, fingerprint: dict[str, str], detail: str) -> None:
    record = {**asdict(decision), "probe": detail, "probed_at": time.time(), "build": fingerprint}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(record, indent=1))
        partial.replace(path)  # atomic: two kernels probing at once both leave a whole file
    except OSError:
        pass  # a read-only cache: probe again next time


def _patched_note() -> str:
    from .build import is_patched

    version = _llama_version()
    return f" (llama-cpp-python {version}, with nbollama's AMX fix)" if is_patched(version) else ""


def _probe_decision(fingerprint: dict[str, str]) -> AMXDecision:
    try:
        outcome = run_probe(_probe_command())
    except ModelError as exc:
        outcome = ProbeOutcome(None, f"the bundled model is missing: {exc}")
    if outcome.safe is None:
        return AMXDecision(
            "off", f"the AMX probe could not run ({outcome.detail}); weights load without repacking", "probe"
        )
    if outcome.safe:
        decision = AMXDecision(
            "on", f"llama.cpp's AMX path passed a probe on this CPU: {outcome.detail}{_patched_note()}", "probe"
        )
    else:
        decision = AMXDecision(
            "off",
            f"llama.cpp's AMX path failed a probe on this CPU ({outcome.detail}; {_ISSUE}); weights load "
            f"without repacking. {_FIX}",
            "probe",
        )
    _write_cached(_cache_path(fingerprint), decision, fingerprint, outcome.detail)
    return decision


def _decide() -> AMXDecision:
    mode = os.environ.get(AMX_ENV, "").strip().lower()
    if mode not in ("", "auto", "on", "off", "probe"):
        raise InvalidParamsError(f"{AMX_ENV}={os.environ[AMX_ENV]!r}: must be on, off or probe (or unset)")
    if mode == "off":
        return AMXDecision("off", f"{AMX_ENV}=off: weights load without repacking", "env")
    if not {"amx_tile", "amx_int8"} <= cpu_flags():
        return AMXDecision("absent", "this CPU has no AMX", "machine")
    if "AMX_INT8 = 1" not in llama_system_info():
        return AMXDecision("absent", "this llama.cpp build has no AMX (built without -march=native)", "machine")
    if mode == "on":
        return AMXDecision("on", f"{AMX_ENV}=on, not probed", "env")
    fingerprint = build_fingerprint()
    if mode != "probe":
        cached = _read_cached(_cache_path(fingerprint))
        if cached is not None:
            return cached
    return _probe_decision(fingerprint)


_lock = threading.Lock()
_decided: AMXDecision | None = None


def decide() -> AMXDecision:
    """This process's decision, made once (a probe of a few seconds the first time on a machine)."""
    global _decided
    with _lock:
        if _decided is None:
            _decided = _decide()
        return _decided


def reset() -> None:
    """Forget this process's decision (after changing ``NBOLLAMA_AMX``); the next load decides again."""
    global _decided
    with _lock:
        _decided = None


def main() -> int:
    flags = cpu_flags()
    wanted = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni")))
    print(f"cpu: {cpu_model()}; {'AMX' if 'amx_tile' in flags else 'no AMX'}")
    print(f"cpu flags: {' '.join(wanted) or '(no AVX-512 or AMX flags)'}")
    print(f"llama-cpp-python {_llama_version()}: {llama_system_info()}")
    print(decide().line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
