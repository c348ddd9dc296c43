"""``look_in_lab.py`` in the page: Run All as the menus do, wait until every cell has run and
the kernel is idle, open the nbollama side panel, stretch the viewport over the notebook, and
``look_at`` one notebook (screenshots, then the scan of ``look_scan``)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from look_lab import VIEWPORT, LabServer
from look_scan import JS_SCAN, PANEL, NotebookReport, Problem, dedupe, judge, layout_warnings

__all__ = [
    "JS_KERNEL_IDLE",
    "JS_PROMPTS",
    "OPEN_PANEL",
    "RUN_ALL",
    "look_at",
    "open_panel",
    "run_all",
    "stretch_to_notebook",
    "wait_all_run",
    "wait_kernel_idle",
]

MAX_PAGE_HEIGHT = 15_000  # Chromium's screenshots stop being reliable beyond ~16k px
RUN_ALL = "notebook:run-all-cells"
OPEN_PANEL = "nbollama:open-panel"

JS_KERNEL_IDLE = f"""() => {{
    const panel = document.querySelector('{PANEL}');
    if (!panel) return false;
    const app = window.jupyterapp;
    if (app && app.shell.currentWidget && app.shell.currentWidget.sessionContext) {{
        const ctx = app.shell.currentWidget.sessionContext;
        return !!(ctx.session && ctx.session.kernel) && ctx.kernelDisplayStatus === 'idle';
    }}
    return !!panel.querySelector('.jp-Notebook-ExecutionIndicator[data-status="idle"]');
}}"""

# Prompts of the code cells: "[3]:", "[*]:" (queued or running) or "[ ]:" (never run).
JS_PROMPTS = f"""() => [...document.querySelectorAll('{PANEL} .jp-Notebook .jp-CodeCell')]
    .map(c => (c.querySelector('.jp-InputArea-prompt') || {{textContent: ''}}).textContent.trim())"""

_JS_HAS_COMMAND = "name => !!(window.jupyterapp && window.jupyterapp.commands.hasCommand(name))"
# Started, not awaited: "Run All" resolves only when the last cell has run.
_JS_EXECUTE = """name => {
    window.jupyterapp.commands.execute(name).catch(e => console.error('look_in_lab: ' + name, e));
    return true;
}"""


def wait_kernel_idle(page: Any, timeout_s: float) -> None:
    page.wait_for_function(JS_KERNEL_IDLE, timeout=timeout_s * 1000, polling=250)


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
        prompts = page.evaluate(JS_PROMPTS)
        idle = page.evaluate(JS_KERNEL_IDLE)
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
    const s = document.querySelector('{PANEL} .jp-WindowedPanel-outer')
        || document.querySelector('{PANEL} .jp-Notebook');
    const cells = document.querySelectorAll('{PANEL} .jp-Notebook .jp-Cell');
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
    page.locator(f"{PANEL} .jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
    wait_kernel_idle(page, 120)
    page.wait_for_timeout(500)
    run_all(page)
    try:
        prompts = wait_all_run(page, timeout_s, time.monotonic())
    except TimeoutError as e:
        report.problems.append(Problem(0, "timeout", str(e)))
        prompts = page.evaluate(JS_PROMPTS)
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
        cells = page.evaluate(JS_SCAN)
        code = page.locator(f"{PANEL} .jp-Notebook .jp-CodeCell")
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
    report.problems = dedupe(report.problems + judge(cells))
    report.warnings = dedupe(layout_warnings(cells))
    if strict:
        report.problems += report.warnings
    return report
