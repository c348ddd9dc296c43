"""What a user installs is what the tests run.

Two environments a user can have, each built from scratch once per run:

* ``wheel``: the built wheel alone in a new venv, as ``pip install nbollama-*.whl``
  (no extras, no test tools);
* ``setup.sh``: ``scripts/setup.sh`` without ``--test`` in a clean copy of the
  repository, which is what ``scripts/lab.sh`` (the README's first command) runs.

In each: every module of the package imports, the bundled model assembles, and
every teaching notebook runs top to bottom through a kernel of THAT venv (in
quick mode, with the checks of ``test_examples``), with no error and no stderr
output in any cell. A package the code imports but does not declare fails here
with its name, where the test environment's extras would have hidden it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from conftest import REPO, noisy_outputs
from nbclient import NotebookClient
from test_examples import CHECKS, EXAMPLES

#: Packages only the test extra brings: a user's environment has none of them.
TEST_ONLY = ("pytest", "trio", "playwright", "ruff", "deptry", "mypy", "import-linter")
_MISSING = re.compile(r"No module named '([\w.]+)'")

pytestmark = pytest.mark.user_install


@dataclass(frozen=True)
class UserEnv:
    name: str
    venv: Path
    home: Path  # a scratch directory of this environment

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
        done = subprocess.run(
            [str(self.python), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.environ(), **(env or {})},
            cwd=self.home,
        )
        if done.returncode != 0:
            raise AssertionError(explain(self.name, done.stdout + done.stderr))
        return done.stdout

    def environ(self) -> dict[str, str]:
        """The test process's environment as a user's shell would have it with this venv active."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def kernel(self, root: Path) -> str:
        """A kernelspec under ``root/kernels`` that starts this venv's Python; its name."""
        name = f"nbollama-user-{self.name.replace('.', '-')}"
        spec = root / "kernels" / name
        spec.mkdir(parents=True, exist_ok=True)
        (spec / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": [str(self.python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    "display_name": f"nbollama ({self.name})",
                    "language": "python",
                    "env": {"PATH": self.environ()["PATH"], "VIRTUAL_ENV": str(self.venv)},
                }
            )
        )
        return name


def explain(where: str, output: str) -> str:
    """A failure message that names the missing package when an import failed."""
    missing = sorted(set(_MISSING.findall(output)))
    head = (
        f"in the {where} environment, nbollama needs {', '.join(repr(m) for m in missing)}, "
        "which the user's install does not have: declare it in pyproject.toml's dependencies\n"
        if missing
        else f"in the {where} environment:\n"
    )
    return head + output[-6000:]


def _base_python() -> str:
    """The interpreter a user's ``python -m venv`` starts from (not the test venv)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _pip_install(venv: Path, *args: str) -> None:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _copy_working_tree(target: Path) -> None:
    """The repository's files as a clean clone has them (tracked and not ignored), without builds."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        source = REPO / raw.decode()
        if source.is_file():
            (target / raw.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / raw.decode())


@pytest.fixture(scope="module", params=["wheel", "setup.sh"])
def user_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UserEnv]:
    home = tmp_path_factory.mktemp(f"user-{request.param.replace('.', '-')}")
    if request.param == "wheel":
        dist = home / "dist"
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), str(REPO)],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        (wheel,) = dist.glob("nbollama-*.whl")
        venv = home / "venv"
        subprocess.run([_base_python(), "-m", "venv", str(venv)], check=True, timeout=300)
        # the pin only picks the llama-cpp-python version pip's wheel cache holds (a compile otherwise)
        _pip_install(venv, "--constraint", str(REPO / ".ci" / "constraints.txt"), str(wheel))
    else:
        clone = home / "clone"
        _copy_working_tree(clone)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(REPO / ".venv"))
        )
        env["PYTHON"] = _base_python()
        done = subprocess.run(
            ["bash", "scripts/setup.sh"], cwd=clone, capture_output=True, text=True, timeout=1800, env=env
        )
        assert done.returncode == 0, explain("setup.sh", done.stdout + done.stderr)
        venv = clone / ".venv"
    yield UserEnv(request.param, venv, home)


def test_the_user_env_holds_no_test_tools(user_env: UserEnv) -> None:
    listed = json.loads(user_env.run("-m", "pip", "list", "--format=json"))
    names = {p["name"].lower() for p in listed}
    assert "nbollama" in names
    assert not names & set(TEST_ONLY), f"{sorted(names & set(TEST_ONLY))} are in the user's venv"


def test_every_module_imports_and_the_model_assembles(user_env: UserEnv) -> None:
    script = """
import importlib, pkgutil, nbollama
for module in pkgutil.walk_packages(nbollama.__path__, "nbollama."):
    importlib.import_module(module.name)
from nbollama.models import default_model_path
print(default_model_path())
"""
    # assembled into an empty cache: the user's first run, not the test run's cached copy
    out = user_env.run("-c", script, env={"NBOLLAMA_CACHE": str(user_env.home / "cache")})
    assert Path(out.strip().splitlines()[-1]).stat().st_size > 100_000_000


def test_the_labextension_is_enabled(user_env: UserEnv) -> None:
    out = subprocess.run(
        [str(user_env.venv / "bin" / "jupyter"), "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        env=user_env.environ(),
    )
    listing = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)  # its colours, off
    assert re.search(r"nbollama v\S+ enabled OK \(python, nbollama\)", listing), listing


@pytest.mark.notebook
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_example_runs_in_the_user_env(
    user_env: UserEnv, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("NBOLLAMA_QUICK", "1")
    kernel = user_env.kernel(tmp_path / "jupyter")
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS[name]))
    client = NotebookClient(
        nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except Exception as exc:  # the cell's error, with the package a user lacks named
        raise AssertionError(explain(user_env.name, f"{name}: {exc}")) from None
    problems = noisy_outputs(nb)
    assert not problems, explain(user_env.name, f"{name}:\n" + "\n".join(problems))
