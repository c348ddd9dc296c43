"""The JupyterLab extension, installed: listed by ``jupyter labextension list``,
and driven in a real ``jupyter lab`` with Debian's Chromium through Playwright.

The browser test opens a notebook, loads nbollama and a 4-slot engine, runs a
background ``%%generate`` of 8 prompts and watches the side panel and the
status-bar item follow it; then cancels a long request from the panel and
checks that the kernel's result says so. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
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
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: the code cells of the notebook in view (a restored workspace can hold other, hidden ones)
CODE_CELLS = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell"

EIGHT_PROMPTS = [
    "Name a colour.",
    "Name a fruit.",
    "Name a planet.",
    "Name a river.",
    "Name a mountain.",
    "Name a tree.",
    "Name a bird.",
    "Name a metal.",
]
CELLS = [
    "%load_ext nbollama",
    "%nbollama load --parallel 4 --ctx 512",
    "%%generate --background --max-tokens 48 --seed 1\n" + "\n---\n".join(EIGHT_PROMPTS),
    "%%generate --background --max-tokens 400 --temperature 0.8 --seed 2 --out long_run\n"
    "Write a very long story about a lighthouse keeper, chapter by chapter.",
    "import time\n"
    "for _ in range(600):\n"
    "    if 'long_run' in globals():\n"
    "        break\n"
    "    time.sleep(0.05)\n"
    "print('FINISH', [r.finish_reason for r in long_run], [r.completion_tokens for r in long_run])",
    "%unload_ext nbollama",
    "%load_ext nbollama",
]


def jupyter_command() -> list[str]:
    """The test environment's ``jupyter`` (the one beside this Python)."""
    beside = Path(sys.executable).with_name("jupyter")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "jupyter"]


# -- installed and enabled -------------------------------------------------------------


def test_labextension_list_reports_nbollama_enabled_and_ok() -> None:
    run = subprocess.run(
        [*jupyter_command(), "labextension", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = ANSI.sub("", run.stdout + run.stderr)
    assert run.returncode == 0, output
    line = next((x for x in output.splitlines() if re.match(r"\s*nbollama\s+v", x)), None)
    assert line is not None, (
        f"nbollama is not installed as a prebuilt extension (pip install .):\n{output}"
    )
    assert re.search(r"nbollama\s+v0\.1\.0\s+enabled\s+.*OK", line), line
    assert "(python, nbollama)" in line, "install.json should name the Python package"


# -- the view model's own unit tests (jest) ----------------------------------------------


def test_jest_unit_tests_of_the_panel_pass() -> None:
    """``jlpm test`` in labextension/: the snapshot -> view rules and the kernel link."""
    source = REPO / "labextension"
    jlpm = Path(sys.executable).with_name("jlpm")
    assert jlpm.exists(), "jlpm comes with jupyterlab, a dependency of nbollama"
    if not (source / "node_modules" / ".bin" / "jest").exists():
        install = subprocess.run(
            [str(jlpm), "install"], cwd=source, capture_output=True, text=True, timeout=600
        )
        assert install.returncode == 0, install.stdout + install.stderr
    run = subprocess.run(
        [str(jlpm), "test"], cwd=source, capture_output=True, text=True, timeout=300
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    match = re.search(r"Tests:\s+(\d+) passed, (\d+) total", output)
    assert match and match.group(1) == match.group(2) and int(match.group(1)) >= 20, output


# -- a real jupyter lab ------------------------------------------------------------------


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    log: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _require_browser() -> None:
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


def _write_notebook(path: Path, cells: list[str] = CELLS) -> None:
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


def _quiet_settings(settings: Path) -> None:
    """No news or update toasts over the panel."""
    target = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    _require_browser()
    base = tmp_path_factory.mktemp("lab")
    root, settings, workspaces = base / "root", base / "settings", base / "workspaces"
    for d in (root, settings, workspaces):
        d.mkdir()
    _quiet_settings(settings)
    _write_notebook(root / "panel.ipynb")
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "jupyter-lab.log"
    port, token = _free_port(), secrets.token_hex(16)
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


def _run_cell(page: Any, index: int) -> None:
    """Select code cell ``index`` and run it (Shift+Enter), as a person would."""
    cell = page.locator(CODE_CELLS).nth(index)
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def _accept_kernel_dialog(page: Any) -> None:
    """Take the preselected kernel if JupyterLab asks (on a busy machine it can open the
    notebook before it has read the kernel specs, and then asks which kernel to start)."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and "Select Kernel" in dialog.first.inner_text():
        dialog.first.locator(".jp-mod-accept").click()
        dialog.first.wait_for(state="detached", timeout=30_000)


def _run_first_cell(page: Any) -> None:
    """Run cell 0 once the kernel is idle; again if a busy machine swallowed the keystroke.

    On a loaded machine JupyterLab can take Shift+Enter before its kernel
    connection is ready and drop the execution; ``%load_ext`` is safe to repeat.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(
        timeout=120_000
    )
    for _ in range(3):
        _accept_kernel_dialog(page)
        _run_cell(page, 0)
        try:
            _wait_cell_done(page, 0, timeout_ms=30_000)
            return
        except PlaywrightTimeoutError:
            continue
    raise AssertionError("the first cell never ran (is the kernel starting?)")


def _wait_cell_done(page: Any, index: int, timeout_ms: int = 120_000) -> None:
    """Until cell ``index`` shows an execution count (not ``[*]``)."""
    prompt = page.locator(CODE_CELLS).nth(index).locator(".jp-InputArea-prompt")
    page.wait_for_function(
        "el => /\\[\\d+\\]/.test(el.textContent)", arg=prompt.element_handle(), timeout=timeout_ms
    )


def _cell_output(page: Any, index: int) -> str:
    return str(
        page.locator(CODE_CELLS).nth(index).locator(".jp-OutputArea").inner_text()
    )


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_panel_follows_the_engine_and_cancels_a_slot(lab: LabServer) -> None:
    from playwright.sync_api import expect, sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(60_000)
            page.goto(f"{lab.url}/lab/tree/panel.ipynb?token={lab.token}")

            page.locator(CODE_CELLS).first.wait_for()
            panel = page.locator("#nbollama-panel")
            tab = page.locator('.lm-TabBar-tab[data-id="nbollama-panel"]')
            tab.click()
            expect(panel).to_be_visible()
            hint_code = panel.locator(".nbollama-hint-code")
            status = page.locator("#nbollama-status")

            # a fresh kernel: nbollama is not loaded
            expect(hint_code).to_have_text("%load_ext nbollama", timeout=90_000)
            expect(panel.locator(".nbollama-live")).to_be_hidden()
            expect(status).to_be_hidden()
            page.screenshot(path=str(ARTIFACTS / "panel-not-loaded.png"))

            _run_first_cell(page)
            expect(hint_code).to_have_text("%nbollama load")
            expect(status).to_have_text("nbollama: no model")

            _run_cell(page, 1)
            _wait_cell_done(page, 1)
            rows = panel.locator(".nbollama-slot-row")
            expect(rows).to_have_count(4)
            expect(panel.locator(".nbollama-hint")).to_be_hidden()
            expect(panel.locator(".nbollama-model")).not_to_be_empty()
            expect(panel.locator(".nbollama-meta")).to_contain_text("parallel 4")
            expect(status).to_have_text("nbollama idle")
            assert [rows.nth(i).get_attribute("data-slot") for i in range(4)] == [
                "0",
                "1",
                "2",
                "3",
            ]

            # 8 prompts on 4 slots: several generate at once
            _run_cell(page, 2)
            page.wait_for_function(
                "document.querySelectorAll('#nbollama-panel .nbollama-slot-row[data-state=\"generating\"]').length >= 2",
                timeout=120_000,
            )
            page.screenshot(path=str(ARTIFACTS / "panel-busy.png"))
            page.locator("#nbollama-panel").screenshot(path=str(ARTIFACTS / "panel.png"))
            expect(status).to_have_text(re.compile(r"^nbollama [1-4]/4 busy · [\d.]+ tok/s"))

            page.wait_for_function(
                """() => {
                    const p = document.querySelector('#nbollama-panel');
                    const rows = [...p.querySelectorAll('.nbollama-slot-row')];
                    const total = Number(p.querySelector('.nbollama-total-tokens').dataset.value);
                    const queue = p.querySelector('.nbollama-queue').dataset.length;
                    return rows.length === 4 && rows.every(r => r.dataset.state === 'idle')
                        && queue === '0' && total >= 8;
                }""",
                timeout=240_000,
            )
            expect(status).to_have_text(re.compile(r"^nbollama idle"))
            assert panel.locator(".nbollama-sparkline path").get_attribute("d"), (
                "the sparkline has samples"
            )
            assert "%" in (panel.locator(".nbollama-membar-used").get_attribute("style") or "")
            page.locator("#nbollama-panel").screenshot(path=str(ARTIFACTS / "panel-idle.png"))

            # the status-bar item opens the panel
            tab.click()  # collapse the sidebar
            expect(panel).to_be_hidden()
            status.click()
            expect(panel).to_be_visible()

            # cancel a long request from the panel
            _run_cell(page, 3)
            busy = panel.locator('.nbollama-slot-row[data-state="generating"]')
            busy.first.wait_for(timeout=120_000)
            slot = busy.first.get_attribute("data-slot")
            assert slot is not None
            row = panel.locator(f'.nbollama-slot-row[data-slot="{slot}"]')
            cancel = row.locator(".nbollama-cancel")
            expect(cancel).to_be_enabled()
            cancel.click()
            expect(panel.locator(".nbollama-notice")).to_contain_text(
                re.compile(rf"Cancelled request \d+ on slot {slot}\.")
            )
            expect(row).to_have_attribute("data-badge", "cancelled", timeout=10_000)
            page.locator("#nbollama-panel").screenshot(path=str(ARTIFACTS / "panel-cancelled.png"))

            _run_cell(page, 4)
            _wait_cell_done(page, 4)
            output = _cell_output(page, 4)
            match = re.search(r"FINISH \['(\w+)'\] \[(\d+)\]", output)
            assert match, output
            assert match.group(1) == "cancelled" and int(match.group(2)) < 400, output

            # unloading closes the comm from the kernel side
            _run_cell(page, 5)
            _wait_cell_done(page, 5)
            expect(hint_code).to_have_text("%load_ext nbollama")
            expect(panel.locator(".nbollama-live")).to_be_hidden()
            expect(status).to_be_hidden()
            page.screenshot(path=str(ARTIFACTS / "panel-unloaded.png"))

            # loaded again, then the kernel restarts: the panel follows both
            _run_cell(page, 6)
            _wait_cell_done(page, 6)
            expect(hint_code).to_have_text("%nbollama load")
            page.get_by_role("menuitem", name="Kernel", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Restart Kernel…")).first.click()
            page.locator(".jp-Dialog .jp-mod-accept").click()
            expect(hint_code).to_have_text("%load_ext nbollama", timeout=60_000)
            expect(status).to_be_hidden()
        except Exception:
            for page in browser.contexts[0].pages if browser.contexts else []:
                page.screenshot(path=str(ARTIFACTS / "panel-failure.png"))
            raise
        finally:
            browser.close()
    ours = [e for e in errors if "nbollama" in e.lower()]
    assert not ours, ours


# -- adaptive, reproducible, the prefix cache; no %load_ext -------------------------------------

SYSTEM = (
    "You are a patient tutor for a first course in chemistry. Answer in two short sentences, "
    "with concrete numbers and units where they help, and correct misconceptions kindly. "
) * 4
MODES_CELLS = [
    # no %load_ext nbollama: loading an engine from Python is enough for the panel
    "import nbollama\n"
    'engine = nbollama.load(parallel="adaptive", max_parallel=6, ctx=512, reproducible=True)\n'
    "print('LOADED', engine.parallel, engine.parallel_max)",
    f"SYSTEM = {SYSTEM!r}\n"
    "warm = engine.generate([SYSTEM + 'What is a mole?'], max_tokens=2, temperature=0)\n"
    "long = engine.submit(SYSTEM + 'What is an ion? Explain at length.', max_tokens=200, temperature=0)",
    "r = long.result(timeout=300)\nprint('LONG', r.finish_reason)",
]


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_panel_shows_adaptive_reproducible_and_cache_hits_after_a_python_load(
    lab: LabServer,
) -> None:
    """A notebook that only calls ``nbollama.load()``: the panel finds the engine, says
    "parallel 4 of 6", adaptive with its target and last change, reproducible, and tags the
    slot whose prompt came from the prefix cache; the footer gives the hit rate."""
    from playwright.sync_api import expect, sync_playwright

    _write_notebook(lab.root / "modes.ipynb", MODES_CELLS)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page, panel = _open_with_panel(browser, lab, "modes", errors)
            expect(panel.locator(".nbollama-hint-code")).to_have_text(
                "%load_ext nbollama", timeout=90_000
            )

            page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(
                timeout=120_000
            )
            _accept_kernel_dialog(page)
            _run_cell(page, 0)
            _wait_cell_done(page, 0, timeout_ms=180_000)
            assert "LOADED 4 6" in _cell_output(page, 0), _cell_output(page, 0)
            expect(panel.locator(".nbollama-live")).to_be_visible(timeout=30_000)
            expect(panel.locator(".nbollama-slot-row")).to_have_count(6)
            expect(panel.locator(".nbollama-meta")).to_contain_text("parallel 4 of 6")
            expect(panel.locator(".nbollama-mode-adaptive")).to_have_text("adaptive · throughput")
            expect(panel.locator(".nbollama-mode-reproducible")).to_be_visible()
            expect(panel.locator(".nbollama-adaptive-change")).to_contain_text(
                "last change: parallel=4 of 6"
            )
            expect(panel.locator(".nbollama-prefix-cache")).to_contain_text("prefix cache 0% hit")
            expect(panel).to_have_attribute("data-adaptive", "yes")

            _run_cell(page, 1)
            tag = panel.locator(".nbollama-slot-row .nbollama-cache-hit:not([hidden])")
            expect(tag).to_have_count(1, timeout=180_000)
            expect(tag).to_have_text(re.compile(r"^cached \d+/\d+$"))
            cached, total = map(int, re.findall(r"\d+", tag.inner_text()))
            assert 0 < cached < total, (cached, total)
            expect(panel.locator(".nbollama-prefix-cache")).to_contain_text(
                re.compile(r"prefix cache [1-9]\d*% hit · [\d,]+ tokens reused")
            )
            panel.screenshot(path=str(ARTIFACTS / "panel-modes.png"))

            # the tag goes with the request: once it ended and the slot is idle, no tag
            _run_cell(page, 2)
            _wait_cell_done(page, 2, timeout_ms=300_000)
            assert "LONG" in _cell_output(page, 2), _cell_output(page, 2)
            expect(tag).to_have_count(0, timeout=30_000)
        except Exception:
            for opened in browser.contexts[0].pages if browser.contexts else []:
                opened.screenshot(path=str(ARTIFACTS / "panel-modes-failure.png"))
            raise
        finally:
            browser.close()
            _shut_down_kernel(lab, "modes.ipynb")  # its engine must not slow the next tests
    ours = [e for e in errors if "nbollama" in e.lower()]
    assert not ours, ours


def _open_with_panel(browser: Any, lab: LabServer, name: str, errors: list[str]) -> tuple[Any, Any]:
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


TWO_ENGINES_CELLS = [
    "%load_ext nbollama\n"
    "%nbollama load --as small --parallel 2 --ctx 256\n"
    "%nbollama load --as wide --parallel 6 --ctx 256 --kv-type q8_0",
    "%nbollama use wide",
    "%nbollama unload small",
]


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_panel_shows_two_engines_with_a_selector(lab: LabServer) -> None:
    """Two named engines: the panel lists both in its selector, shows the default's slots, follows
    a pick in the selector and ``%nbollama use``, and hides the selector when one is left."""
    from playwright.sync_api import expect, sync_playwright

    _write_notebook(lab.root / "engines.ipynb", TWO_ENGINES_CELLS)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page, panel = _open_with_panel(browser, lab, "engines", errors)
            _run_first_cell(page)
            select = panel.locator(".nbollama-engine-select")
            expect(select).to_be_visible(timeout=30_000)
            expect(select.locator("option")).to_have_count(2)
            expect(select.locator("option").nth(0)).to_have_text(re.compile(r"^small · .* · 2 slots · f16 \(default\)$"))
            expect(select.locator("option").nth(1)).to_have_text(re.compile(r"^wide · .* · 6 slots · q8_0$"))
            expect(panel).to_have_attribute("data-shown", "small")
            expect(panel.locator(".nbollama-slot-row")).to_have_count(2)
            panel.screenshot(path=str(ARTIFACTS / "panel-two-engines.png"))

            select.select_option("wide")  # a pick in the panel shows that engine
            expect(panel).to_have_attribute("data-shown", "wide")
            expect(panel.locator(".nbollama-slot-row")).to_have_count(6)
            expect(panel.locator(".nbollama-memory-kv")).to_contain_text("q8_0")

            select.select_option("small")
            expect(panel.locator(".nbollama-slot-row")).to_have_count(2)
            _run_cell(page, 1)  # %nbollama use wide: the kernel's default moves, the selection stays
            _wait_cell_done(page, 1)
            expect(select.locator("option").nth(1)).to_have_text(re.compile(r"\(default\)$"))
            expect(panel).to_have_attribute("data-shown", "small")

            _run_cell(page, 2)  # unloading the engine shown: the panel goes back to the default
            _wait_cell_done(page, 2)
            expect(panel).to_have_attribute("data-shown", "wide")
            expect(select).to_be_hidden()
            expect(panel.locator(".nbollama-slot-row")).to_have_count(6)
        except Exception:
            for opened in browser.contexts[0].pages if browser.contexts else []:
                opened.screenshot(path=str(ARTIFACTS / "panel-engines-failure.png"))
            raise
        finally:
            browser.close()
            _shut_down_kernel(lab, "engines.ipynb")
    ours = [e for e in errors if "nbollama" in e.lower()]
    assert not ours, ours


def _shut_down_kernel(lab: LabServer, notebook: str) -> None:
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


# -- a remote engine in the panel ------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_panel_shows_a_remote_engines_slots(lab: LabServer, model_path: Path) -> None:
    """The panel on a kernel connected to a real llama-server: its 4 slots, this kernel's
    requests and another client's, the server's own figures; ``disconnect`` empties it."""
    import threading

    import httpx
    from playwright.sync_api import expect, sync_playwright

    from nbollama.llama_server import LlamaServer, find_binary

    if find_binary() is None:
        pytest.fail("llama-server is not built: run `python -m nbollama.llama_server build`", pytrace=False)
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}  # no spinning compute threads on a busy CI machine
    with LlamaServer(model_path, ["-np", "4", "--metrics", "-c", "2048"], env=passive) as server:
        cells = [
            "%load_ext nbollama",
            f"%nbollama connect {server.url}",
            "%%generate --background --max-tokens 64 --seed 1\n" + "\n---\n".join(EIGHT_PROMPTS[:3]),
            "%nbollama disconnect",
        ]
        _write_notebook(lab.root / "remote.ipynb", cells)
        stop = threading.Event()
        other_started = threading.Event()

        def other_client() -> None:  # a plain HTTP client of the same server
            body = {"prompt": "The history of lighthouses:", "n_predict": 400, "stream": True}
            with httpx.Client(timeout=120) as client, client.stream(
                "POST", f"{server.url}/completion", json=body
            ) as response:
                for _ in response.iter_lines():
                    other_started.set()
                    if stop.is_set():
                        return

        errors: list[str] = []
        other = threading.Thread(target=other_client, daemon=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page, panel = _open_with_panel(browser, lab, "remote", errors)
                _run_first_cell(page)
                _run_cell(page, 1)
                _wait_cell_done(page, 1)
                assert "connected to llama-server" in _cell_output(page, 1)

                rows = panel.locator(".nbollama-slot-row")
                expect(rows).to_have_count(4)
                expect(panel).to_have_attribute("data-kind", "llama-server")
                expect(panel.locator(".nbollama-remote-endpoint")).to_have_text(f"llama-server · {server.url}")
                expect(panel.locator(".nbollama-meta")).to_contain_text("server parallel 4")

                other.start()
                assert other_started.wait(120), "the other client never got a token"
                _run_cell(page, 2)
                page.wait_for_function(
                    """() => {
                        const rows = [...document.querySelectorAll('#nbollama-panel .nbollama-slot-row')];
                        const mine = rows.filter(r => r.dataset.state !== 'idle' && r.dataset.origin === 'this kernel');
                        const theirs = rows.filter(r => r.dataset.state !== 'idle' && r.dataset.origin === 'another client');
                        return mine.length >= 2 && theirs.length === 1;
                    }""",
                    timeout=120_000,
                )
                theirs = panel.locator('.nbollama-slot-row[data-origin="another client"]')
                expect(theirs.locator(".nbollama-preview")).to_have_text("another client")
                expect(theirs.locator(".nbollama-cancel")).to_be_disabled()
                expect(panel.locator(".nbollama-remote-server")).to_contain_text(re.compile(r"server: \d running"))
                expect(panel.locator(".nbollama-remote-client")).to_contain_text("this kernel:")
                expect(page.locator("#nbollama-status")).to_have_text(re.compile(r"^nbollama [2-4]/4 busy"))
                panel.screenshot(path=str(ARTIFACTS / "panel-remote.png"))
                page.screenshot(path=str(ARTIFACTS / "panel-remote-page.png"))

                stop.set()
                page.wait_for_function(
                    """() => [...document.querySelectorAll('#nbollama-panel .nbollama-slot-row')]
                        .every(r => r.dataset.state === 'idle')""",
                    timeout=240_000,
                )
                _run_cell(page, 3)
                _wait_cell_done(page, 3)
                expect(panel.locator(".nbollama-hint-code")).to_have_text("%nbollama load")
            except Exception:
                for opened in browser.contexts[0].pages if browser.contexts else []:
                    opened.screenshot(path=str(ARTIFACTS / "panel-remote-failure.png"))
                raise
            finally:
                stop.set()
                browser.close()
        other.join(30)
    ours = [e for e in errors if "nbollama" in e.lower()]
    assert not ours, ours
