"""The JupyterLab server and the browser ``look_in_lab.py`` drives: ``jupyter lab`` on 127.0.0.1
over a temporary root, Debian's Chromium under Playwright, and the notebooks put in that root."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "VIEWPORT",
    "LabServer",
    "chromium",
    "copy_clean",
    "free_port",
    "jupyter_command",
    "lab_server",
    "missing_browser",
    "quiet_settings",
    "write_notebook",
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 950}


def missing_browser() -> list[str]:
    """What is missing to drive Chromium: empty when the browser checks can run."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install '.[test]')")
    return missing


def jupyter_command() -> list[str]:
    """The ``jupyter`` beside this Python (the project's .venv)."""
    beside = Path(sys.executable).with_name("jupyter")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "jupyter"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quiet_settings(settings: Path) -> None:
    """No news or update toasts over the notebook."""
    target = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    log: Path

    def api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Delete every session (and its kernel): the next notebook starts with the memory free."""
        for session in self.api("GET", "/api/sessions") or []:
            with contextlib.suppress(urllib.error.URLError):
                self.api("DELETE", f"/api/sessions/{session['id']}")


@contextlib.contextmanager
def lab_server(
    root: Path, base: Path, *, quick: bool = True, log: Path | None = None
) -> Iterator[LabServer]:
    """``jupyter lab`` on 127.0.0.1 serving ``root``; its state lives under ``base``."""
    settings, workspaces, runtime = base / "settings", base / "workspaces", base / "runtime"
    for d in (settings, workspaces, runtime):
        d.mkdir(parents=True, exist_ok=True)
    quiet_settings(settings)
    log = log or base / "jupyter-lab.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    cmd = [
        *jupyter_command(),
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={workspaces}",
        "--LabApp.news_url=",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run commands as the menus do
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI run as root
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)}
    if quick:
        env["NBOLLAMA_QUICK"] = "1"
    else:
        env.pop("NBOLLAMA_QUICK", None)
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env)
        try:
            deadline = time.monotonic() + 90
            while True:
                if server.poll() is not None:
                    raise RuntimeError(
                        f"jupyter lab exited with {server.returncode}:\n{log.read_text()}"
                    )
                try:
                    with urllib.request.urlopen(
                        f"{url}/api/status?token={token}", timeout=2
                    ) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"jupyter lab did not answer within 90 s:\n{log.read_text()}"
                    )
                time.sleep(0.25)
            yield LabServer(url=url, token=token, root=root, log=log)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright, headless."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def copy_clean(notebook: Path, root: Path) -> Path:
    """The notebook copied into ``root`` with outputs and execution counts cleared."""
    data = json.loads(notebook.read_text())
    for cell in data.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    target = root / notebook.name
    target.write_text(json.dumps(data, indent=1))
    return target


def write_notebook(path: Path, cells: list[str]) -> None:
    """A notebook of code cells, no outputs, on the python3 kernel."""
    path.write_text(
        json.dumps(
            {
                "cells": [
                    {
                        "cell_type": "code",
                        "execution_count": None,
                        "id": f"cell{i}",
                        "metadata": {},
                        "outputs": [],
                        "source": source,
                    }
                    for i, source in enumerate(cells)
                ],
                "metadata": {
                    "kernelspec": {
                        "display_name": "Python 3 (ipykernel)",
                        "language": "python",
                        "name": "python3",
                    },
                    "language_info": {"name": "python"},
                },
                "nbformat": 4,
                "nbformat_minor": 5,
            },
            indent=1,
        )
    )
