"""A real ``jupyter lab`` and the page helpers the browser tests share.

``serve_lab`` (behind each browser test module's ``lab`` fixture) serves a
temporary root on 127.0.0.1 with quiet settings; the helpers write
notebooks into it, open one with the nbollama side panel, run cells as a
person does (click, Shift+Enter) and wait for them. Debian's Chromium is
driven through Playwright (``CHROMIUM``, ``CHROMIUM_ARGS``); screenshots go to
``ARTIFACTS`` (test-artifacts/).
"""

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

import pytest

__all__ = [
    "ARTIFACTS",
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "CODE_CELLS",
    "LabServer",
    "accept_kernel_dialog",
    "cell_output",
    "chromium",
    "jupyter_command",
    "open_with_panel",
    "require_browser",
    "run_cell",
    "run_first_cell",
    "serve_lab",
    "shut_down_kernel",
    "wait_cell_done",
    "write_notebook",
]

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-gpu",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: the code cells of the notebook in view (a restored workspace can hold other, hidden ones)
CODE_CELLS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell"


def jupyter_command() -> list[str]:
    """The test environment's ``jupyter`` (the one beside this Python)."""
    beside = Path(sys.executable).with_name("jupyter")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "jupyter"]


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    log: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_browser() -> None:
    """Skip without Chromium on a developer's machine; under CI a missing browser fails."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install '.[test]')")
    if not missing:
        return
    reason = "browser test needs " + " and ".join(missing)
    if os.environ.get("CI"):
        pytest.fail(reason + " -- CI must install it", pytrace=False)
    pytest.skip(reason)


def write_notebook(path: Path, cells: list[str]) -> None:
    """A notebook of code cells, no outputs, on the python3 kernel."""
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"cell{i}",
                "metadata": {},
                "outputs": [],
                "source": src,
            }
            for i, src in enumerate(cells)
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
    }
    path.write_text(json.dumps(notebook, indent=1))


def quiet_settings(settings: Path) -> None:
    """No news or update toasts over the panel."""
    target = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


def serve_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """A ``jupyter lab`` on 127.0.0.1 for one test module: a module's ``lab`` fixture yields from it.

    Skips (fails under CI) without Chromium and Playwright, before starting anything.
    """
    require_browser()
    base = tmp_path_factory.mktemp("lab")
    root, settings, workspaces = base / "root", base / "settings", base / "workspaces"
    for d in (root, settings, workspaces):
        d.mkdir()
    quiet_settings(settings)
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "jupyter-lab.log"
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
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI run as root
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(base / "runtime")}
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                if server.poll() is not None:
                    raise AssertionError(
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
                    raise AssertionError(
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


def run_cell(page: Any, index: int) -> None:
    """Select code cell ``index`` and run it (Shift+Enter), as a person would."""
    cell = page.locator(CODE_CELLS).nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def accept_kernel_dialog(page: Any) -> None:
    """Take the preselected kernel if JupyterLab asks (on a busy machine it can open the
    notebook before it has read the kernel specs, and then asks which kernel to start)."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and "Select Kernel" in dialog.first.inner_text():
        dialog.first.locator(".jp-mod-accept").click()
        dialog.first.wait_for(state="detached", timeout=30_000)


def run_first_cell(page: Any) -> None:
    """Run cell 0 once the kernel is idle; again if a busy machine swallowed the keystroke.

    On a loaded machine JupyterLab can take Shift+Enter before its kernel
    connection is ready and drop the execution; ``%load_ext`` is safe to repeat.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(
        timeout=120_000
    )
    for _ in range(3):
        accept_kernel_dialog(page)
        run_cell(page, 0)
        try:
            wait_cell_done(page, 0, timeout_ms=30_000)
            return
        except PlaywrightTimeoutError:
            continue
    raise AssertionError("the first cell never ran (is the kernel starting?)")


def wait_cell_done(page: Any, index: int, timeout_ms: int = 120_000) -> None:
    """Until cell ``index`` shows an execution count (not ``[*]``)."""
    prompt = page.locator(CODE_CELLS).nth(index).locator(".jp-InputArea-prompt")
    page.wait_for_function(
        "el => /\\[\\d+\\]/.test(el.textContent)", arg=prompt.element_handle(), timeout=timeout_ms
    )


def cell_output(page: Any, index: int) -> str:
    return str(
        page.locator(CODE_CELLS).nth(index).locator(".jp-OutputArea").inner_text()
    )


def open_with_panel(browser: Any, lab: LabServer, name: str, errors: list[str]) -> tuple[Any, Any]:
    """``name``.ipynb in a page of its own workspace (the other tests' default one does not
    reopen it), the side panel open; console errors go to ``errors``."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(60_000)
    page.goto(f"{lab.url}/lab/workspaces/{name}/tree/{name}.ipynb?token={lab.token}")
    page.locator(CODE_CELLS).first.wait_for()
    panel = page.locator("#nbollama-panel")
    page.locator('.lm-TabBar-tab[data-id="nbollama-panel"]').click()
    expect(panel).to_be_visible()
    return page, panel


def shut_down_kernel(lab: LabServer, notebook: str) -> None:
    """Delete the notebook's session (and so its kernel) through the server's REST API."""
    headers = {"Authorization": f"token {lab.token}"}
    request = urllib.request.Request(f"{lab.url}/api/sessions", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        sessions = json.loads(response.read())
    for session in sessions:
        if session.get("path", "").endswith(notebook):
            delete = urllib.request.Request(
                f"{lab.url}/api/sessions/{session['id']}", method="DELETE", headers=headers
            )
            urllib.request.urlopen(delete, timeout=30).close()


@contextlib.contextmanager
def chromium(failure_png: str) -> Iterator[tuple[Any, list[str]]]:
    """Debian's Chromium through Playwright: yields the browser and the list its pages' errors go to
    (``open_with_panel`` fills it); on a failure every page is saved to ``failure_png``, and once
    the browser is closed no error may name nbollama."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser, errors
        except Exception:
            for opened in browser.contexts[0].pages if browser.contexts else []:
                opened.screenshot(path=str(ARTIFACTS / failure_png))
            raise
        finally:
            browser.close()
    ours = [e for e in errors if "nbollama" in e.lower()]
    assert not ours, ours
