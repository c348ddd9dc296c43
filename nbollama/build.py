"""Build llama-cpp-python with the fixes nbollama carries, as a wheel with a version of its own.

llama-cpp-python compiles llama.cpp from its sdist. nbollama keeps a few
upstream fixes in ``nbollama/patches/`` (each with its reason, its upstream
reference and when to drop it). This tool downloads the sdist, applies them,
gives the result a local version (``0.3.36+nbollama.1``) so that pip never
mistakes it for a stock build, and builds the wheel once into
``$NBOLLAMA_CACHE/wheels``::

    python -m nbollama.build                 # build for the installed version, install it here
    python -m nbollama.build --wheel-only    # build (or find) the wheel, print its path
    python -m nbollama.build --version 0.3.36 --wheel-only --wheel-dir DIR

A patch that does not apply cleanly to a version stops the build with exit
status 3 (``scripts/setup.sh`` then installs the stock build, which the
engine's AMX guard protects). It uses the standard library only:
``scripts/setup.sh`` runs this file by its path before nbollama is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "PATCH_LEVEL",
    "BuildError",
    "PatchDoesNotApply",
    "patches",
    "patched_version",
    "public_version",
    "is_patched",
    "download_sdist",
    "patched_sources",
    "build_wheel",
    "wheel_dir",
    "run_logged",
]

#: Raised with every change to ``patches/``: a new level is a new version, so no cache holds it yet.
PATCH_LEVEL = 1
_LOCAL = "nbollama"
PATCHES = Path(__file__).resolve().with_name("patches")
EXIT_PATCH_DOES_NOT_APPLY = 3


class BuildError(RuntimeError):
    """The sdist could not be downloaded, or the build failed (the log's path is in the message)."""


class PatchDoesNotApply(BuildError):
    """A patch in ``nbollama/patches/`` does not apply cleanly to this llama-cpp-python version."""


def patches() -> list[Path]:
    return sorted(PATCHES.glob("*.patch"))


def public_version(version: str) -> str:
    """``0.3.36+nbollama.1`` -> ``0.3.36``."""
    return version.split("+", 1)[0]


def patched_version(version: str) -> str:
    return f"{public_version(version)}+{_LOCAL}.{PATCH_LEVEL}"


def is_patched(version: str) -> bool:
    """Whether a llama-cpp-python version string is one this tool built."""
    return f"+{_LOCAL}." in version


def wheel_dir() -> Path:
    # the same rule as nbollama.models.cache_dir (this file may not import the package)
    configured = os.environ.get("NBOLLAMA_CACHE")
    base = Path(configured).expanduser() if configured else Path.home() / ".cache" / "nbollama"
    return base / "wheels"


def run_logged(command: Sequence[str], cwd: Path, log: Path, *, error: type[BuildError] = BuildError) -> None:
    """Run a build step with its output appended to ``log``; its last lines in the error."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(list(command), cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise error(f"{' '.join(command[:4])} failed (exit {done.returncode}); log {log}:\n" + "\n".join(tail))


def download_sdist(version: str, into: Path, log: Path) -> Path:
    """llama-cpp-python's sdist for ``version`` (public part), extracted into ``into``; its root."""
    base = public_version(version)
    run_logged(
        [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={base}", "--no-deps",
         "--no-binary", ":all:", "-d", str(into), "-q"],
        into,
        log,
    )
    archives = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise BuildError(f"pip downloaded no sdist of llama-cpp-python {base} into {into}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(into, filter="data")
    root = into / archives[0].name.removesuffix(".tar.gz")
    if not (root / "vendor" / "llama.cpp").is_dir():
        raise BuildError(f"the llama-cpp-python {base} sdist has no vendor/llama.cpp")
    return root


def _apply(patch: Path, root: Path, log: Path) -> None:
    """``git apply`` (or ``patch``) after a dry run, so a patch applies whole or not at all."""
    if shutil.which("git"):
        check = ["git", "apply", "--check", "-p1", str(patch)]
        apply = ["git", "apply", "-p1", str(patch)]
    elif shutil.which("patch"):
        check = ["patch", "-p1", "--dry-run", "--forward", "-i", str(patch)]
        apply = ["patch", "-p1", "--forward", "-i", str(patch)]
    else:
        raise BuildError("neither git nor patch is installed: one is needed to apply nbollama's patches")
    run_logged(check, root, log, error=PatchDoesNotApply)
    run_logged(apply, root, log)


def _set_version(root: Path, version: str) -> None:
    """The version scikit-build-core reads (``llama_cpp/__init__.py``), and the sdist's PKG-INFO."""
    init = root / "llama_cpp" / "__init__.py"
    text, n = re.subn(r'__version__ = "[^"]+"', f'__version__ = "{version}"', init.read_text())
    if n != 1:
        raise BuildError(f"no __version__ line in {init}")
    init.write_text(text)
    info = root / "PKG-INFO"
    if info.exists():
        info.write_text(re.sub(r"(?m)^Version: .*$", f"Version: {version}", info.read_text(), count=1))


def patched_sources(version: str, work: Path, log: Path) -> Path:
    """The sdist of ``version`` with every patch applied and the patched version set; its root."""
    root = download_sdist(version, work, log)
    for patch in patches():
        try:
            _apply(patch, root, log)
        except PatchDoesNotApply as exc:
            raise PatchDoesNotApply(
                f"{patch.name} does not apply to llama-cpp-python {public_version(version)} "
                f"(see nbollama/patches/README.md for when it can be dropped); log {log}"
            ) from exc
    _set_version(root, patched_version(version))
    return root


def find_wheel(version: str, directory: Path) -> Path | None:
    """A wheel of the patched ``version`` already built into ``directory``."""
    name = f"llama_cpp_python-{patched_version(version)}-"
    found = sorted(p for p in directory.glob("*.whl") if p.name.startswith(name))
    return found[-1] if found else None


def build_wheel(
    version: str, directory: Path | None = None, *, say: Callable[[str], None] = lambda _m: None
) -> Path:
    """The patched wheel of ``version``, built once into ``directory`` (default: ``wheel_dir()``)."""
    directory = directory or wheel_dir()
    found = find_wheel(version, directory)
    if found is not None:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    target = patched_version(version)
    log = directory / f"build-{target}.log"
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix="nbollama-build-") as tmp:
        work = Path(tmp)
        say(f"nbollama: llama-cpp-python {public_version(version)}: sdist, then "
            f"{', '.join(p.name for p in patches())} (log: {log})")
        root = patched_sources(version, work, log)
        say(f"nbollama: compiling llama-cpp-python {target} (about 7 minutes on 2 cores)")
        run_logged([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work / "dist"), str(root)], work, log)
        built = next((work / "dist").glob("*.whl"), None)
        if built is None:
            raise BuildError(f"pip made no wheel; log {log}")
        partial = directory / (built.name + ".partial")
        shutil.copy2(built, partial)
        partial.replace(directory / built.name)  # atomic: a wheel found there is whole
    return directory / built.name


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbollama.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    parser.add_argument("--wheel-dir", type=Path, default=None, help=f"default: {wheel_dir()}")
    parser.add_argument("--wheel-only", action="store_true", help="build or find the wheel; do not install it")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    version = args.version or _installed_version()
    if version is None:
        print("nbollama.build: llama-cpp-python is not installed here; give --version", file=sys.stderr)
        return 2

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        wheel = build_wheel(version, args.wheel_dir, say=say)
        if not args.wheel_only:
            say(f"nbollama: installing {wheel.name} into {sys.prefix}")
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                                   "--force-reinstall", "-q", str(wheel)])
            if done.returncode != 0:
                raise BuildError(f"pip could not install {wheel}")
            say("nbollama: done; restart the kernel (or Python) to load it")
    except PatchDoesNotApply as exc:
        print(f"nbollama.build: {exc}", file=sys.stderr)
        return EXIT_PATCH_DOES_NOT_APPLY
    except BuildError as exc:
        print(f"nbollama.build: {exc}", file=sys.stderr)
        return 1
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
