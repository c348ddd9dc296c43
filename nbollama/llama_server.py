"""llama.cpp's ``llama-server``, built from the same llama.cpp that llama-cpp-python vendors.

The engine is measured against it (``benchmarks/vs_llama_server.py``), the
remote-engine tests talk to it, and a notebook can start one to tune. The
binary is built once per llama-cpp-python version from ``vendor/llama.cpp`` in
that version's sdist (pip downloads it), and cached under
``$NBOLLAMA_CACHE/llama-server/<version>/``: a build takes about 8 minutes on
2 cores, so nothing here builds unless asked to.

    python -m nbollama.llama_server build      # build if missing; print the path
    python -m nbollama.llama_server path       # print the path, or exit 1 if not built
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from . import amx
from . import build as _build
from .exceptions import LlamaServerError
from .models import cache_dir

__all__ = [
    "LlamaServerError",
    "LlamaServer",
    "binary_path",
    "find_binary",
    "build",
    "free_port",
]

#: Options that keep the build offline and small: no web UI download, no curl, no TLS.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
)


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def binary_path(version: str | None = None) -> Path:
    """Where the binary for ``version`` (default: the installed llama-cpp-python) lives once built."""
    return cache_dir() / "llama-server" / (version or llama_cpp_version()) / "llama-server"


def find_binary() -> Path | None:
    """The cached binary for the installed llama-cpp-python, or None if it was never built."""
    path = binary_path()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def build(*, jobs: int | None = None, quiet: bool = False) -> Path:
    """Build llama-server from the installed llama-cpp-python's sdist if it is not cached; its path.

    A llama-cpp-python built by ``nbollama.build`` (``0.3.36+nbollama.1``) gets the same
    patches here, so the engine and llama-server run the same llama.cpp.
    """
    found = find_binary()
    if found is not None:
        return found
    version = llama_cpp_version()
    target = binary_path(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    log = target.parent / "build.log"
    log.write_text("")
    say: Callable[[str], None] = (
        (lambda _msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    )
    with tempfile.TemporaryDirectory(prefix="nbollama-llama-server-") as tmp:
        work = Path(tmp)
        patched = _build.is_patched(version)
        say(f"nbollama: the llama-cpp-python {version} sdist{', patched' if patched else ''} (log: {log})")
        try:
            root = (_build.patched_sources if patched else _build.download_sdist)(version, work, log)
            sources = root / "vendor" / "llama.cpp"
            say(f"nbollama: building llama-server from {sources.relative_to(work)} (about 8 minutes on 2 cores)")
            build_dir = work / "build"
            _build.run_logged(["cmake", "-S", str(sources), "-B", str(build_dir), *CMAKE_OPTIONS], work, log)
            _build.run_logged(
                ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 1)],
                work,
                log,
            )
        except _build.BuildError as exc:
            raise LlamaServerError(str(exc)) from exc
        built = next(build_dir.rglob("bin/llama-server"), None)
        if built is None:
            raise LlamaServerError(f"the build finished but made no bin/llama-server; log {log}")
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # atomic: a cached path is always a whole binary
    say(f"nbollama: llama-server built: {target}")
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """A llama-server process on 127.0.0.1 with a free port; ``with LlamaServer(...) as server``.

    ``args`` go to llama-server as they are (``["-np", "4", "--metrics"]``), plus
    ``--no-repack`` where the AMX guard (``nbollama.amx``) found the AMX path unsafe:
    llama-server is built from the same llama.cpp as the engine's llama-cpp-python.
    ``start()`` waits until ``/health`` answers 200, and fails with the
    server's own last lines if it exits first.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        args: Sequence[str] = (),
        *,
        binary: str | os.PathLike[str] | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        found = Path(binary) if binary is not None else find_binary()
        if found is None:
            raise LlamaServerError(
                "llama-server is not built for this llama-cpp-python; run "
                "`python -m nbollama.llama_server build` once (about 8 minutes)"
            )
        self.binary = found
        self.model = Path(model)
        self.args = list(args)
        self.port = port or free_port()
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def start(self, timeout: float = 120.0) -> LlamaServer:
        import httpx

        guard = ["--no-repack"] if not amx.decide().use_extra_bufts and "--no-repack" not in self.args else []
        command = [
            str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
            *self.args, *guard,
        ]  # fmt: skip
        environment = {**os.environ, **(self.env or {})}
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LlamaServerError(
                    f"llama-server exited with {self.process.returncode} before it was ready:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise LlamaServerError(f"llama-server did not become healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 10 s)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL at once: a server that dies mid-request (used by the fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._log.close()
            os.unlink(self._log.name)


@contextlib.contextmanager
def running(model: str | os.PathLike[str], args: Sequence[str] = ()) -> Iterator[LlamaServer]:
    """``with running(model, ["-np", "4"]) as server: server.url``."""
    with LlamaServer(model, args) as server:
        yield server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbollama.llama_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "path"])
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: every core)")
    args = parser.parse_args(argv)
    if args.command == "path":
        found = find_binary()
        if found is None:
            print(f"not built: {binary_path()} (run: python -m nbollama.llama_server build)", file=sys.stderr)
            return 1
        print(found)
        return 0
    try:
        print(build(jobs=args.jobs))
    except LlamaServerError as exc:
        print(f"nbollama: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
