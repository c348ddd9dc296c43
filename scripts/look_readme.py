"""The README's screenshots from real runs (``look_in_lab.py --readme``): a ``%%generate
--background`` cell streaming eight prompts into four slots with the side panel open, and the
inline dashboard while four slots generate."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from look_lab import chromium, lab_server, write_notebook
from look_page import open_panel, run_all, wait_kernel_idle
from look_scan import PANEL, shown

__all__ = ["README_DASHBOARD", "README_GENERATE", "readme_screenshots"]

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
                    page.locator(f"{PANEL} .jp-Notebook .jp-Cell").first.wait_for()
                    wait_kernel_idle(page, 120)
                    page.wait_for_timeout(500)
                    path = take(page, out)
                    shots.append(path)
                    echo(f"   screenshot {shown(path)}")
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
    page.locator(f"{PANEL} .jp-Notebook .jp-CodeCell").nth(2).scroll_into_view_if_needed()
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
    board = f"{PANEL} .nbollama-dashboard"
    # the first four answered (their TTFT bars drawn), the next four generating
    page.wait_for_function(_JS_DONE, arg=[board, 4], timeout=600_000, polling=200)
    page.wait_for_function(_JS_GENERATING, arg=[board, 4, 24], timeout=300_000, polling=100)
    page.wait_for_timeout(1500)  # the chart redraws once a second while busy
    path = out / "dashboard.png"
    page.locator(board).screenshot(path=str(path))
    return path
