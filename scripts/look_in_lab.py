"""Look at the teaching notebooks the way a user does: Run All in JupyterLab, in Chromium.

    .venv/bin/python scripts/look_in_lab.py [NOTEBOOK ...] [--out DIR] [--full] [--timeout S] [--strict]
    .venv/bin/python scripts/look_in_lab.py --readme [DIR]   # the README's screenshots, into docs/
    .venv/bin/python scripts/look_in_lab.py --url http://127.0.0.1:8899 --token T examples/01_quickstart.ipynb

``--url`` looks at notebooks on a JupyterLab that is already running (the one
``scripts/lab.sh`` started, say), as they are, named relative to its root.

Without NOTEBOOK arguments it takes every ``examples/*.ipynb``. The notebooks
are copied (outputs cleared) into a temporary root, one ``jupyter lab`` serves
them (``NBOLLAMA_QUICK=1`` in its environment unless ``--full``), and Debian's
Chromium, driven by Playwright, opens each one in a fresh workspace, runs the
JupyterLab command ``notebook:run-all-cells``, waits until every code cell has
an execution count and the kernel is idle, opens the nbollama side panel and
takes screenshots:

* ``<out>/<name>.png``: the whole notebook (the viewport is stretched to the
  notebook's height, so nothing is left below the fold);
* ``<out>/<name>-cellNN.png``: the output area of each code cell NN (1-based
  position among all cells, as in JupyterLab's status bar) holding a widget,
  a plotly chart or ``%%generate`` cards;
* ``<out>/<name>-panel.png``: the nbollama side panel after the run.

It then scans every output area's DOM for problems: stderr, errors and
tracebacks, plotly charts without a single point (or with no size), widgets
that never rendered ("Loading widget...", "Error displaying widget"),
``%%generate`` cards showing an error, code cells that never ran, uncaught
errors in the page. Charts and widgets cut off on the right (drawn wider
than their box) are reported as warnings; ``--strict`` counts them as
problems. A report per notebook is printed (``<out>/report.json`` holds the
full texts); the exit status is 1 if any problem was found.

``--readme`` takes the README's two screenshots instead, from real runs: a
``%%generate --background`` cell streaming eight prompts into four slots with
the side panel open (``jupyterlab-generate-and-panel.png``), and the inline
dashboard while four slots generate (``dashboard.png``).

A dev tool (nothing here is imported by nbollama); the browser test
``tests/test_quickstart_browser.py`` imports it by path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
DEFAULT_OUT = REPO / "test-artifacts" / "look"
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
MAX_PAGE_HEIGHT = 15_000  # Chromium's screenshots stop being reliable beyond ~16k px
RUN_ALL = "notebook:run-all-cells"
OPEN_PANEL = "nbollama:open-panel"
TEXT_LIMIT = 300


# -- results --------------------------------------------------------------------------------


@dataclass
class Problem:
    cell: int  # 1-based position among all cells (JupyterLab's "Cell N/M"); 0 for the page
    kind: str
    text: str

    def __str__(self) -> str:
        where = f"cell {self.cell}" if self.cell else "page"
        text = self.text[:TEXT_LIMIT].rstrip().replace("\n", "\n      | ")
        return f"{where}: {self.kind}: {text}"


@dataclass
class NotebookReport:
    name: str
    code_cells: int = 0
    cells_run: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # layout: cut-off charts and widgets
    screenshots: list[Path] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        """Everything, with the problems' full texts (as scanned, up to 2000 characters)."""
        return {
            "name": self.name,
            "code_cells": self.code_cells,
            "cells_run": self.cells_run,
            "seconds": round(self.seconds, 1),
            "problems": [vars(p) for p in self.problems],
            "warnings": [vars(p) for p in self.warnings],
            "console_errors": self.console_errors,
            "screenshots": [_shown(p) for p in self.screenshots],
        }

    def format(self) -> str:
        lines = [
            f"== {self.name}: {self.cells_run}/{self.code_cells} code cells run in "
            f"{self.seconds:.0f} s, {len(self.problems)} problem(s), {len(self.warnings)} warning(s)"
        ]
        lines += [f"   PROBLEM {p}" for p in self.problems]
        lines += [f"   WARNING {p}" for p in self.warnings]
        lines += [f"   (browser console error: {e[:TEXT_LIMIT]})" for e in self.console_errors]
        lines += [f"   screenshot {_shown(p)}" for p in self.screenshots]
        return "\n".join(lines)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# -- the browser and the server ------------------------------------------------------------


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


# -- in the page -----------------------------------------------------------------------------

# The visible notebook panel (one per workspace here, but hidden tabs stay in the DOM).
_PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"

_JS_KERNEL_IDLE = f"""() => {{
    const panel = document.querySelector('{_PANEL}');
    if (!panel) return false;
    const app = window.jupyterapp;
    if (app && app.shell.currentWidget && app.shell.currentWidget.sessionContext) {{
        const ctx = app.shell.currentWidget.sessionContext;
        return !!(ctx.session && ctx.session.kernel) && ctx.kernelDisplayStatus === 'idle';
    }}
    return !!panel.querySelector('.jp-Notebook-ExecutionIndicator[data-status="idle"]');
}}"""

# Prompts of the code cells: "[3]:", "[*]:" (queued or running) or "[ ]:" (never run).
_JS_PROMPTS = f"""() => [...document.querySelectorAll('{_PANEL} .jp-Notebook .jp-CodeCell')]
    .map(c => (c.querySelector('.jp-InputArea-prompt') || {{textContent: ''}}).textContent.trim())"""

_JS_HAS_COMMAND = "name => !!(window.jupyterapp && window.jupyterapp.commands.hasCommand(name))"
# Started, not awaited: "Run All" resolves only when the last cell has run.
_JS_EXECUTE = """name => {
    window.jupyterapp.commands.execute(name).catch(e => console.error('look_in_lab: ' + name, e));
    return true;
}"""

# Every output area's state, cell by cell; the problems are judged in Python.
_JS_SCAN = f"""() => {{
    const text = el => (el.innerText || el.textContent || '').trim();
    // how many px of el's right side are hidden by an ancestor that clips (up to the cell)
    const cutOff = (el, stop, own = false) => {{
        let right = el.getBoundingClientRect().right;
        if (own && getComputedStyle(el).overflowX !== 'visible')
            right = Math.max(right, el.getBoundingClientRect().left + el.scrollWidth);
        let hidden = 0;
        for (let e = own ? el : el.parentElement; e && e !== stop; e = e.parentElement) {{
            if (getComputedStyle(e).overflowX === 'visible') continue;
            const b = e.getBoundingClientRect();
            hidden = Math.max(hidden, right - (b.left + e.clientWidth));
        }}
        return hidden;
    }};
    const cells = [...document.querySelectorAll('{_PANEL} .jp-Notebook .jp-Cell')];
    const app = window.jupyterapp;
    const current = app && app.shell.currentWidget;
    const nb = current && current.content && current.content.widgets
        && current.content.widgets.length === cells.length ? current : null;
    return cells.map((cell, i) => {{
        if (!cell.classList.contains('jp-CodeCell')) return null;
        const prompt = cell.querySelector('.jp-InputArea-prompt');
        const area = cell.querySelector('.jp-OutputArea');
        const outputs = area ? [...area.querySelectorAll('.jp-OutputArea-output')] : [];
        // the model says which outputs are errors (JupyterLab renders them as stderr text)
        const widget = nb && nb.content.widgets[i];
        const model = widget && widget.model && widget.model.outputs;
        const types = [];
        if (model) for (let j = 0; j < model.length; j++) types.push(model.get(j).type);
        const children = area ? [...area.querySelectorAll(':scope > .jp-OutputArea-child')] : [];
        const plots = area ? [...area.querySelectorAll('.js-plotly-plot')].map(p => {{
            const traces = Array.isArray(p.data) ? p.data : [];
            const length = v => (v && typeof v.length === 'number') ? v.length : 0;
            const points = traces.map(t => Math.max(length(t.x), length(t.y), length(t.z),
                                                    length(t.values), length(t.lat)));
            const box = p.getBoundingClientRect();
            const named = p.querySelector('.gtitle') || p.querySelector('.annotation-text');
            const title = named ? named.textContent : '';
            return {{traces: traces.length, points, width: box.width, height: box.height,
                     hasData: Array.isArray(p.data), title: String(title || ''),
                     cutOff: Math.round(cutOff(p.querySelector('.main-svg') || p, cell))}};
        }}) : [];
        // widgets whose content is wider than their box (plots are measured above)
        const wide = area ? [...area.querySelectorAll('.jupyter-widgets')]
            .filter(w => !w.querySelector('.js-plotly-plot') && !w.closest('.js-plotly-plot'))
            .map(w => ({{name: (w.className.match(/nbollama-[\\w-]+/) || ['a widget'])[0],
                         over: Math.round(cutOff(w, cell, true))}}))
            .filter(w => w.over > 2) : [];
        return {{
            index: i + 1,
            prompt: prompt ? prompt.textContent.trim() : '',
            outputs: outputs.map(o => {{
                const child = o.closest('.jp-OutputArea-child');
                const j = children.indexOf(child);
                return {{
                    mime: o.getAttribute('data-mime-type') || '',
                    type: (j >= 0 && types.length === children.length) ? types[j] : '',
                    text: text(o).slice(0, 2000),
                }};
            }}),
            errors: area ? [...area.querySelectorAll(
                '[data-mime-type="application/vnd.jupyter.error"], .jp-OutputArea-error'
            )].map(e => text(e).slice(0, 2000)) : [],
            widgetText: area ? [...area.querySelectorAll(
                '.jp-OutputArea-output, .jupyter-widgets'
            )].map(text).filter(t => /^(Loading widget\\.\\.\\.|Error displaying widget)/.test(t))
                .slice(0, 5) : [],
            cardErrors: area ? [...area.querySelectorAll('.nbollama-card .nbollama-error')]
                .map(text).filter(Boolean) : [],
            plots,
            widgets: area ? area.querySelectorAll('.jupyter-widgets, .widget-box, ' +
                '[data-mime-type="application/vnd.jupyter.widget-view+json"]').length : 0,
            cards: area ? area.querySelectorAll('.nbollama-generate, .nbollama-compare').length : 0,
            wide,
        }};
    }}).filter(Boolean);
}}"""

_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^-{20,}\s*\n\w+(Error|Exception)")
_WIDGET_REPR = re.compile(r"^[A-Z]\w*\((children|layout|value)=")


def layout_warnings(cells: list[dict[str, Any]]) -> list[Problem]:
    """Charts and widgets cut off on the right: shown, not failed (``--strict`` fails them)."""
    warnings: list[Problem] = []
    for cell in cells:
        n = cell["index"]
        for k, plot in enumerate(cell["plots"], 1):
            if plot["cutOff"] > 2:
                name = f"plot {k}" + (f" {plot['title']!r}" if plot["title"] else "")
                warnings.append(
                    Problem(
                        n,
                        "chart cut off",
                        f"{name}: {plot['cutOff']} px of its right side hidden "
                        f"(drawn in a {plot['width']:.0f} px wide box)",
                    )
                )
        for widget in cell["wide"]:
            warnings.append(
                Problem(
                    n,
                    "widget cut off",
                    f"{widget['name']}: content {widget['over']} px wider than its box",
                )
            )
    return warnings


def judge(cells: list[dict[str, Any]]) -> list[Problem]:
    """Problems in the scanned output areas (see ``_JS_SCAN``)."""
    problems: list[Problem] = []
    for cell in cells:
        n = cell["index"]
        if not re.fullmatch(r"\[\d+\]:?", cell["prompt"]):
            problems.append(Problem(n, "not run", f"prompt is {cell['prompt']!r}"))
        for text in cell["errors"]:
            problems.append(Problem(n, "error", text))
        for output in cell["outputs"]:
            if output["type"] == "error" or (
                output["mime"] == "application/vnd.jupyter.stderr"
                and not output["type"]
                and _TRACEBACK.search(output["text"])
            ):
                # the traceback's first line is a rule of dashes: start at the exception
                problems.append(Problem(n, "error", re.sub(r"^-{20,}\s*", "", output["text"])))
            elif output["mime"] == "application/vnd.jupyter.stderr":
                problems.append(Problem(n, "stderr", output["text"]))
            elif output["mime"] == "text/plain" and _WIDGET_REPR.match(output["text"]):
                problems.append(Problem(n, "widget shown as text", output["text"]))
        for text in cell["widgetText"]:
            problems.append(Problem(n, "widget not rendered", text))
        for text in cell["cardErrors"]:
            problems.append(Problem(n, "%%generate card error", text))
        for k, plot in enumerate(cell["plots"], 1):
            name = f"plot {k}" + (f" {plot['title']!r}" if plot["title"] else "")
            if not plot["hasData"] or not any(plot["points"]):
                problems.append(
                    Problem(
                        n,
                        "empty plotly chart",
                        f"{name}: {plot['traces']} trace(s), points per trace {plot['points']}",
                    )
                )
            if plot["width"] < 10 or plot["height"] < 10:
                problems.append(
                    Problem(
                        n,
                        "plotly chart without size",
                        f"{name}: {plot['width']:.0f}x{plot['height']:.0f} px",
                    )
                )
    return problems


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[int, str, str]] = set()
    kept = []
    for p in problems:
        key = (p.cell, p.kind, p.text[:TEXT_LIMIT])
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def wait_kernel_idle(page: Any, timeout_s: float) -> None:
    page.wait_for_function(_JS_KERNEL_IDLE, timeout=timeout_s * 1000, polling=250)


def run_all(page: Any) -> None:
    """``notebook:run-all-cells``, through the app's command registry, else the Run menu."""
    if page.evaluate(_JS_HAS_COMMAND, RUN_ALL):
        page.evaluate(_JS_EXECUTE, RUN_ALL)
        return
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).first.click()


def wait_all_run(page: Any, timeout_s: float, started: float) -> list[str]:
    """Until no code cell is queued or running and the kernel is idle, twice a second apart.

    Returns the final prompts. Every cell normally ends with a count; after
    an error JupyterLab drops the queued cells back to ``[ ]``, and those are
    reported as "not run" rather than waited for.
    """
    deadline = started + timeout_s
    calm = 0
    prompts: list[str] = []
    while time.monotonic() < deadline:
        prompts = page.evaluate(_JS_PROMPTS)
        idle = page.evaluate(_JS_KERNEL_IDLE)
        pending = any("*" in p for p in prompts)
        done = all(re.fullmatch(r"\[\d+\]:?", p) for p in prompts)
        if idle and not pending and (done or time.monotonic() - started > 5):
            calm += 1
            if calm >= 2:
                return prompts
        else:
            calm = 0
        page.wait_for_timeout(500)
    raise TimeoutError(f"cells still running after {timeout_s:.0f} s; prompts: {' '.join(prompts)}")


def open_panel(page: Any) -> bool:
    """The nbollama side panel, if the extension is there."""
    if page.evaluate(_JS_HAS_COMMAND, OPEN_PANEL):
        page.evaluate(_JS_EXECUTE, OPEN_PANEL)
    else:
        tab = page.locator('.lm-TabBar-tab[data-id="nbollama-panel"]')
        if not tab.count():
            return False
        if "lm-mod-current" not in (tab.first.get_attribute("class") or ""):
            tab.first.click()
    page.locator("#nbollama-panel").wait_for(state="visible", timeout=10_000)
    return True


_JS_MISSING_HEIGHT = f"""() => {{
    const s = document.querySelector('{_PANEL} .jp-WindowedPanel-outer')
        || document.querySelector('{_PANEL} .jp-Notebook');
    const cells = document.querySelectorAll('{_PANEL} .jp-Notebook .jp-Cell');
    if (!s || !cells.length) return 0;
    s.scrollTop = 0;
    // below the last cell JupyterLab leaves room to scroll past the end: not wanted
    const last = cells[cells.length - 1].getBoundingClientRect().bottom;
    return Math.round(last - s.getBoundingClientRect().bottom);
}}"""


# the side panel down to its last visible part (the panel itself is as tall as the page)
_JS_PANEL_BOX = """() => {
    const panel = document.querySelector('#nbollama-panel');
    const box = panel.getBoundingClientRect();
    let bottom = box.top;
    for (const part of panel.children) {
        if (!part.hidden) bottom = Math.max(bottom, part.getBoundingClientRect().bottom);
    }
    return {x: box.left, y: box.top, width: box.width, height: Math.max(24, bottom - box.top + 8)};
}"""


def stretch_to_notebook(page: Any) -> None:
    """Make the viewport as tall as the notebook (scrolled to its top), so one screenshot holds it.

    Off-screen cells may be laid out at an estimated height until they are
    shown, so the height is measured again until it settles.
    """
    height = VIEWPORT["height"]
    for _ in range(4):
        missing = int(page.evaluate(_JS_MISSING_HEIGHT))
        if missing <= 40 and (missing >= -10 or height == VIEWPORT["height"]):
            break
        height = max(VIEWPORT["height"], min(MAX_PAGE_HEIGHT, height + missing + 30))
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.wait_for_timeout(1000)  # relayout; plotly resizes to its new box
    page.evaluate(_JS_MISSING_HEIGHT)  # scrolled to the top
    page.wait_for_timeout(300)


def look_at(
    page: Any,
    lab: LabServer,
    name: str,
    out: Path,
    *,
    timeout_s: float = 600,
    strict: bool = False,
) -> NotebookReport:
    """Open ``name`` in ``lab``, Run All, screenshot and scan it."""
    report = NotebookReport(name=name)
    stem = Path(name).stem
    started = time.monotonic()
    page.on(
        "console",
        lambda m: report.console_errors.append(m.text) if m.type == "error" else None,
    )
    page.on("pageerror", lambda e: report.problems.append(Problem(0, "page error", str(e))))
    workspace = re.sub(r"[^A-Za-z0-9_-]", "-", stem)
    page.goto(f"{lab.url}/lab/workspaces/look-{workspace}/tree/{name}?token={lab.token}")
    page.locator(f"{_PANEL} .jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
    wait_kernel_idle(page, 120)
    page.wait_for_timeout(500)
    run_all(page)
    try:
        prompts = wait_all_run(page, timeout_s, time.monotonic())
    except TimeoutError as e:
        report.problems.append(Problem(0, "timeout", str(e)))
        prompts = page.evaluate(_JS_PROMPTS)
    report.seconds = time.monotonic() - started
    report.code_cells = len(prompts)
    report.cells_run = sum(bool(re.fullmatch(r"\[\d+\]:?", p)) for p in prompts)
    page.wait_for_timeout(1000)  # the last throttled widget and comm updates

    open_panel(page)
    out.mkdir(parents=True, exist_ok=True)
    stretch_to_notebook(page)
    try:
        full = out / f"{stem}.png"
        page.screenshot(path=str(full))
        report.screenshots.append(full)
        cells = page.evaluate(_JS_SCAN)
        code = page.locator(f"{_PANEL} .jp-Notebook .jp-CodeCell")
        for k, cell in enumerate(cells):
            if not (cell["widgets"] or cell["plots"] or cell["cards"]):
                continue
            path = out / f"{stem}-cell{cell['index']:02d}.png"
            code.nth(k).locator(".jp-Cell-outputArea").screenshot(path=str(path))
            report.screenshots.append(path)
        panel = page.locator("#nbollama-panel")
        if panel.count() and panel.is_visible():
            path = out / f"{stem}-panel.png"
            page.screenshot(path=str(path), clip=page.evaluate(_JS_PANEL_BOX))
            report.screenshots.append(path)
    finally:
        page.set_viewport_size(VIEWPORT)
    report.problems = _dedupe(report.problems + judge(cells))
    report.warnings = _dedupe(layout_warnings(cells))
    if strict:
        report.problems += report.warnings
    return report


def look_in_lab(
    notebooks: list[Path],
    out: Path,
    *,
    quick: bool = True,
    timeout_s: float = 600,
    strict: bool = False,
    echo: Callable[[str], None] = print,
) -> list[NotebookReport]:
    """Run each notebook in one JupyterLab and look at it; one report per notebook."""
    reports: list[NotebookReport] = []
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="look-in-lab-") as tmp:
        base = Path(tmp)
        root = base / "root"
        root.mkdir()
        names = [copy_clean(nb, root).name for nb in notebooks]
        with (
            lab_server(root, base, quick=quick, log=out / "jupyter-lab.log") as lab,
            chromium() as browser,
        ):
            for name in names:
                echo(f"-- {name}: Run All ...")
                context = browser.new_context(viewport=VIEWPORT)
                page = context.new_page()
                page.set_default_timeout(60_000)
                try:
                    report = look_at(page, lab, name, out, timeout_s=timeout_s, strict=strict)
                except Exception as e:  # one broken notebook must not hide the others
                    report = NotebookReport(name=name)
                    report.problems.append(Problem(0, "tool failure", f"{type(e).__name__}: {e}"))
                    with contextlib.suppress(Exception):
                        failed = out / f"{Path(name).stem}-failure.png"
                        page.screenshot(path=str(failed))
                        report.screenshots.append(failed)
                finally:
                    context.close()
                    with contextlib.suppress(Exception):
                        lab.shutdown_kernels()
                echo(report.format())
                reports.append(report)
    return reports


# -- the README's screenshots --------------------------------------------------------------

README_PROMPTS = [
    "Name a colour.",
    "Name a fruit.",
    "Name a planet.",
    "Name a river.",
    "Name a mountain.",
    "Name a tree.",
    "Name a bird.",
    "Name a metal.",
]
README_GENERATE = [
    "%load_ext nbollama",
    "%nbollama load --parallel 4 --ctx 512",
    "%%generate --background --max-tokens 96 --temperature 0.7 --seed 1\n"
    + "\n---\n".join(README_PROMPTS),
]
README_DASHBOARD = [
    "%load_ext nbollama",
    "%nbollama load --parallel 4 --ctx 512",
    "%nbollama dashboard",
    "%%generate --background --max-tokens 96 --temperature 0.7 --seed 2\n"
    "Explain continuous batching in one sentence.\n---\nWrite a haiku about GPUs.\n---\n"
    "Give three uses of a hash table.\n---\nThe capital of Australia is\n---\n"
    "Name three rivers.\n---\nWhat is a compiler?\n---\nWrite a limerick about tea.\n---\n"
    "Why is the sky blue?",
]

# at least ``n`` slot rows generating, one of them at ``tokens`` decoded or more
_JS_GENERATING = """([root, n, tokens]) => {
    const scope = document.querySelector(root);
    if (!scope) return false;
    const rows = [...scope.querySelectorAll('.nbollama-slot-row')];
    const busy = rows.filter(r => r.dataset.state === 'generating'
        || r.querySelector('.nbollama-badge-generating'));
    const decoded = rows.map(r => Number((r.textContent.match(/(\\d+)\\/96/) || [0, 0])[1]));
    return busy.length >= n && Math.max(0, ...decoded) >= tokens;
}"""


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


def readme_screenshots(out: Path, echo: Callable[[str], None] = print) -> list[Path]:
    """The README's two screenshots, from real runs of the bundled model (see the module doc)."""
    out.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="look-in-lab-readme-") as tmp:
        base = Path(tmp)
        root = base / "root"
        root.mkdir()
        write_notebook(root / "generate.ipynb", README_GENERATE)
        write_notebook(root / "dashboard.ipynb", README_DASHBOARD)
        with (
            lab_server(root, base, quick=False, log=base / "jupyter-lab.log") as lab,
            chromium() as browser,
        ):
            for name, take in (
                ("generate.ipynb", _shot_generate_and_panel),
                ("dashboard.ipynb", _shot_dashboard),
            ):
                echo(f"-- {name} ...")
                context = browser.new_context(viewport={"width": 1400, "height": 900})
                page = context.new_page()
                page.set_default_timeout(120_000)
                try:
                    page.goto(f"{lab.url}/lab/workspaces/readme-{Path(name).stem}/tree/{name}?token={lab.token}")
                    page.locator(f"{_PANEL} .jp-Notebook .jp-Cell").first.wait_for()
                    wait_kernel_idle(page, 120)
                    page.wait_for_timeout(500)
                    path = take(page, out)
                    shots.append(path)
                    echo(f"   screenshot {_shown(path)}")
                finally:
                    context.close()
                    with contextlib.suppress(Exception):
                        lab.shutdown_kernels()
    return shots


def _shot_generate_and_panel(page: Any, out: Path) -> Path:
    open_panel(page)
    run_all(page)
    page.wait_for_function(_JS_GENERATING, arg=["#nbollama-panel", 4, 12], timeout=300_000, polling=100)
    # the last code cell in view: the prompts and the first cards beside the panel
    page.locator(f"{_PANEL} .jp-Notebook .jp-CodeCell").nth(2).scroll_into_view_if_needed()
    page.mouse.move(0, 0)
    path = out / "jupyterlab-generate-and-panel.png"
    page.screenshot(path=str(path))
    return path


# the dashboard's count of finished requests, and its TTFT bars drawn
_JS_DONE = """([root, n]) => {
    const scope = document.querySelector(root);
    const monitor = scope && scope.querySelector('.nbollama-slot-monitor');
    const done = monitor ? Number((monitor.textContent.match(/(\\d+) done/) || [0, 0])[1]) : 0;
    return done >= n && scope.querySelectorAll('.barlayer .point').length >= n;
}"""


def _shot_dashboard(page: Any, out: Path) -> Path:
    run_all(page)
    board = f"{_PANEL} .nbollama-dashboard"
    # the first four answered (their TTFT bars drawn), the next four generating
    page.wait_for_function(_JS_DONE, arg=[board, 4], timeout=600_000, polling=200)
    page.wait_for_function(_JS_GENERATING, arg=[board, 4, 24], timeout=300_000, polling=100)
    page.wait_for_timeout(1500)  # the chart redraws once a second while busy
    path = out / "dashboard.png"
    page.locator(board).screenshot(path=str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: examples/*.ipynb")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="screenshots and the server log"
    )
    parser.add_argument("--full", action="store_true", help="real sizes: no NBOLLAMA_QUICK=1")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds per notebook for Run All (default 600)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="count layout warnings (cut-off charts) as problems"
    )
    parser.add_argument("--url", help="a running JupyterLab to look in (no server is started)")
    parser.add_argument("--token", default="", help="that JupyterLab's token")
    parser.add_argument(
        "--readme",
        nargs="?",
        type=Path,
        const=REPO / "docs",
        default=None,
        metavar="DIR",
        help="take the README's screenshots instead (default DIR: docs/)",
    )
    args = parser.parse_args(argv)
    missing = missing_browser()
    if missing:
        print("look_in_lab needs " + " and ".join(missing), file=sys.stderr)
        return 2
    if args.readme is not None:
        readme_screenshots(args.readme.resolve())
        return 0
    if args.url:
        return _look_in_running_lab(args.url, args.token, args.notebooks, args.out.resolve(), args)
    notebooks = args.notebooks or sorted(EXAMPLES.glob("*.ipynb"))
    for nb in notebooks:
        if not nb.is_file():
            parser.error(f"no such notebook: {nb}")
    if len({nb.name for nb in notebooks}) != len(notebooks):
        parser.error("two notebooks with the same file name")
    if args.out.exists():
        for old in args.out.glob("*.png"):
            old.unlink()
    reports = look_in_lab(
        notebooks,
        args.out.resolve(),
        quick=not args.full,
        timeout_s=args.timeout,
        strict=args.strict,
    )
    (args.out / "report.json").write_text(
        json.dumps([r.as_json() for r in reports], indent=1) + "\n"
    )
    bad = [r for r in reports if not r.ok]
    total = sum(len(r.problems) for r in reports)
    print(
        f"\n{len(reports)} notebook(s), {total} problem(s)"
        + (f" in {', '.join(r.name for r in bad)}" if bad else "")
    )
    return 1 if bad else 0


def _look_in_running_lab(
    url: str, token: str, names: list[Path], out: Path, args: argparse.Namespace
) -> int:
    """Run All on notebooks a running JupyterLab serves (names relative to its root)."""
    if not names:
        print("--url needs the notebooks to look at, relative to the server's root", file=sys.stderr)
        return 2
    lab = LabServer(url=url.rstrip("/"), token=token, root=Path("."), log=out / "no-log")
    reports = []
    with chromium() as browser:
        for name in names:
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            page.set_default_timeout(60_000)
            try:
                report = look_at(page, lab, name.as_posix(), out, timeout_s=args.timeout, strict=args.strict)
            finally:
                context.close()
            print(report.format())
            reports.append(report)
    (out / "report.json").write_text(json.dumps([r.as_json() for r in reports], indent=1) + "\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
