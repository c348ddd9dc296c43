"""The inline dashboard in a real JupyterLab with Chromium: slot rows and the plotly chart render and move.

The JupyterLab server and the cell helpers come from ``lab_pages.py``; this
module only writes its own notebook into the server's root. The screenshot
goes to ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lab_pages import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    CODE_CELLS,
    LabServer,
    run_cell,
    run_first_cell,
    serve_lab,
    wait_cell_done,
    write_notebook,
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    yield from serve_lab(tmp_path_factory)


PROMPTS = [
    "Count from 1 to 40, separated by commas:",
    "List the letters of the alphabet:",
    "Name twenty animals:",
    "Write the numbers from 100 down to 60:",
]
CELLS = [
    "%load_ext nbollama",
    "%nbollama load --parallel 4 --ctx 512",
    "import nbollama, nbollama.widgets\n"
    "dashboard = getattr(nbollama, 'dashboard', nbollama.widgets.dashboard)\n"
    "board = dashboard()\n"
    "board",
    f"results = nbollama.generate({PROMPTS!r}, max_tokens=48, temperature=0)\n"
    "print('DONE', [r.finish_reason for r in results])",
]


# the plotly chart's drawing is as wide as its box (plotly's widget first draws at 700 px)
CHART_FITS = """() => {
    const gd = document.querySelector('.nbollama-dashboard .nbollama-throughput-chart .js-plotly-plot');
    const svg = gd && gd.querySelector('.main-svg');
    return !!svg && gd.clientWidth > 100
        && Math.abs(svg.getBoundingClientRect().width - gd.clientWidth) <= 2;
}"""
CHART_WIDTH = """() => document.querySelector(
    '.nbollama-dashboard .nbollama-throughput-chart .js-plotly-plot .main-svg').getBoundingClientRect().width"""


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_dashboard_renders_and_follows_a_generation(lab: LabServer) -> None:
    from playwright.sync_api import expect, sync_playwright

    write_notebook(lab.root / "dashboard.ipynb", CELLS)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(60_000)
            page.goto(f"{lab.url}/lab/tree/dashboard.ipynb?token={lab.token}")
            page.locator(CODE_CELLS).first.wait_for()
            run_first_cell(page)
            for index in (1, 2):
                run_cell(page, index)
                wait_cell_done(page, index)

            board = page.locator(".jp-OutputArea .nbollama-dashboard")
            expect(board).to_be_visible(timeout=90_000)
            rows = board.locator(".nbollama-slot-row")
            expect(rows).to_have_count(4)
            expect(board.locator(".nbollama-header")).to_contain_text("parallel 4")
            expect(board.locator(".nbollama-header")).to_contain_text("ctx/slot 512")
            expect(board.locator(".nbollama-memory")).to_contain_text("KV = parallel x ctx/slot")
            chart = board.locator(".nbollama-throughput-chart .js-plotly-plot")
            expect(chart).to_be_visible(timeout=90_000)

            # the chart is as wide as its box, and stays so when the side panel narrows the notebook
            page.wait_for_function(CHART_FITS, timeout=30_000)
            wide = page.evaluate(CHART_WIDTH)
            page.locator('.lm-TabBar-tab[data-id="nbollama-panel"]').click()
            page.locator("#nbollama-panel").wait_for(state="visible")
            page.wait_for_function(
                f"() => ({CHART_FITS})() && ({CHART_WIDTH})() < {wide} - 50", timeout=30_000
            )
            page.locator('.lm-TabBar-tab[data-id="nbollama-panel"]').click()  # closed again
            page.wait_for_function(
                f"() => ({CHART_FITS})() && ({CHART_WIDTH})() > {wide} - 5", timeout=30_000
            )

            # the generation blocks the cell; the dashboard still moves (monitor thread -> IOPub)
            run_cell(page, 3)
            page.wait_for_function(
                """() => {
                    const board = document.querySelector('.nbollama-dashboard');
                    const generating = board.querySelectorAll('.nbollama-badge-generating').length;
                    const decoded = [...board.querySelectorAll('.nbollama-slot-row')]
                        .map(row => Number((row.textContent.match(/(\\d+)\\/48 tok/) || [0, 0])[1]));
                    return generating >= 2 && Math.max(...decoded) >= 8;
                }""",
                timeout=240_000,
            )
            board.screenshot(path=str(ARTIFACTS / "dashboard-busy.png"))
            wait_cell_done(page, 3, timeout_ms=300_000)
            assert (
                "DONE"
                in page.locator(CODE_CELLS)
                .nth(3)
                .locator(".jp-OutputArea")
                .inner_text()
            )
            # after the run: four requests as TTFT bars, throughput drawn, every slot idle again
            page.wait_for_function(
                "document.querySelectorAll('.nbollama-dashboard .nbollama-throughput-chart .barlayer .point').length >= 8",
                timeout=60_000,
            )
            expect(board.locator(".nbollama-badge-idle")).to_have_count(4, timeout=30_000)
            line = board.locator(
                ".nbollama-throughput-chart .scatterlayer .trace path.js-line"
            ).first
            assert (line.get_attribute("d") or "").count("L") >= 2, (
                "the throughput line has several points"
            )
            expect(board.locator(".nbollama-slot-monitor")).to_contain_text("4 done")
            board.screenshot(path=str(ARTIFACTS / "dashboard.png"))
        except Exception:
            for opened in browser.contexts[0].pages if browser.contexts else []:
                opened.screenshot(path=str(ARTIFACTS / "dashboard-failure.png"))
            raise
        finally:
            browser.close()
    ours = [e for e in errors if "nbollama" in e.lower() or "widget" in e.lower()]
    assert not ours, ours
