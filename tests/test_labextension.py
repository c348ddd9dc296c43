"""The JupyterLab extension, installed: listed by ``jupyter labextension list``,
and driven in a real ``jupyter lab`` with Debian's Chromium through Playwright.

The browser tests open notebooks in one ``jupyter lab`` (``lab_pages.py``): the
side panel and the status-bar item follow a background ``%%generate`` of 8
prompts and cancel a request; adaptive, reproducible and prefix-cache modes;
two engines, a selector pick that pins the panel and the dashboard, and
"follow the default"; a ``%%generate`` cell's own highlighting; a remote
llama-server's slots. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_pages import (
    ARTIFACTS,
    CODE_CELLS,
    LabServer,
    accept_kernel_dialog,
    cell_output,
    chromium,
    jupyter_command,
    open_with_panel,
    run_cell,
    run_first_cell,
    serve_lab,
    shut_down_kernel,
    wait_cell_done,
    write_notebook,
)

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")

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


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    yield from serve_lab(tmp_path_factory)


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


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_panel_follows_the_engine_and_cancels_a_slot(lab: LabServer) -> None:
    from playwright.sync_api import expect

    write_notebook(lab.root / "panel.ipynb", CELLS)
    with chromium("panel-failure.png") as (browser, errors):
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

        run_first_cell(page)
        expect(hint_code).to_have_text("%nbollama load")
        expect(status).to_have_text("nbollama: no model")

        run_cell(page, 1)
        wait_cell_done(page, 1)
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
        run_cell(page, 2)
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
        run_cell(page, 3)
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

        run_cell(page, 4)
        wait_cell_done(page, 4)
        output = cell_output(page, 4)
        match = re.search(r"FINISH \['(\w+)'\] \[(\d+)\]", output)
        assert match, output
        assert match.group(1) == "cancelled" and int(match.group(2)) < 400, output

        # unloading closes the comm from the kernel side
        run_cell(page, 5)
        wait_cell_done(page, 5)
        expect(hint_code).to_have_text("%load_ext nbollama")
        expect(panel.locator(".nbollama-live")).to_be_hidden()
        expect(status).to_be_hidden()
        page.screenshot(path=str(ARTIFACTS / "panel-unloaded.png"))

        # loaded again, then the kernel restarts: the panel follows both
        run_cell(page, 6)
        wait_cell_done(page, 6)
        expect(hint_code).to_have_text("%nbollama load")
        page.get_by_role("menuitem", name="Kernel", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Restart Kernel…")).first.click()
        page.locator(".jp-Dialog .jp-mod-accept").click()
        expect(hint_code).to_have_text("%load_ext nbollama", timeout=60_000)
        expect(status).to_be_hidden()


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
    from playwright.sync_api import expect

    write_notebook(lab.root / "modes.ipynb", MODES_CELLS)
    with chromium("panel-modes-failure.png") as (browser, errors):
        try:
            page, panel = open_with_panel(browser, lab, "modes", errors)
            expect(panel.locator(".nbollama-hint-code")).to_have_text(
                "%load_ext nbollama", timeout=90_000
            )

            page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(
                timeout=120_000
            )
            accept_kernel_dialog(page)
            run_cell(page, 0)
            wait_cell_done(page, 0, timeout_ms=180_000)
            assert "LOADED 4 6" in cell_output(page, 0), cell_output(page, 0)
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

            run_cell(page, 1)
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
            run_cell(page, 2)
            wait_cell_done(page, 2, timeout_ms=300_000)
            assert "LONG" in cell_output(page, 2), cell_output(page, 2)
            expect(tag).to_have_count(0, timeout=30_000)
        finally:
            shut_down_kernel(lab, "modes.ipynb")  # its engine must not slow the next tests


TWO_ENGINES_CELLS = [
    "%load_ext nbollama\n"
    "%nbollama load --as small --parallel 2 --ctx 256\n"
    "%nbollama load --as wide --parallel 6 --ctx 256 --kv-type q8_0",
    "%nbollama dashboard",
    "%nbollama use wide",
    "%nbollama use small",
    "%nbollama unload small",
]


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_panel_shows_two_engines_with_a_selector(lab: LabServer) -> None:
    """Two named engines: the panel lists both in its selector, shows the default's slots and
    follows a pick in it. A pick pins the panel and the dashboard: ``%nbollama use`` leaves them,
    each says "pinned to 'small'"; "follow the default" brings them back to following ``use``.
    The selector goes when one engine is left."""
    from playwright.sync_api import expect

    write_notebook(lab.root / "engines.ipynb", TWO_ENGINES_CELLS)
    with chromium("panel-engines-failure.png") as (browser, errors):
        try:
            page, panel = open_with_panel(browser, lab, "engines", errors)
            run_first_cell(page)
            select = panel.locator(".nbollama-engine-select")
            pin = panel.locator(".nbollama-pin")
            expect(select).to_be_visible(timeout=30_000)
            expect(select.locator("option")).to_have_count(2)
            expect(select.locator("option").nth(0)).to_have_text(re.compile(r"^small · .* · 2 slots · f16 \(default\)$"))
            expect(select.locator("option").nth(1)).to_have_text(re.compile(r"^wide · .* · 6 slots · q8_0$"))
            expect(panel).to_have_attribute("data-shown", "small")
            expect(panel.locator(".nbollama-slot-row")).to_have_count(2)
            expect(pin).to_be_hidden()  # following the default
            panel.screenshot(path=str(ARTIFACTS / "panel-two-engines.png"))

            select.select_option("wide")  # a pick in the panel shows that engine, pinned
            expect(panel).to_have_attribute("data-shown", "wide")
            expect(panel.locator(".nbollama-slot-row")).to_have_count(6)
            expect(panel.locator(".nbollama-memory-kv")).to_contain_text("q8_0")
            expect(pin).to_contain_text("pinned to 'wide'")
            select.select_option("small")
            expect(panel.locator(".nbollama-slot-row")).to_have_count(2)
            expect(panel).to_have_attribute("data-pinned", "small")

            run_cell(page, 1)  # the dashboard, pinned to 'small' from its own selector
            wait_cell_done(page, 1)
            board = page.locator(".jp-OutputArea .nbollama-dashboard")
            expect(board.locator(".nbollama-slot-row")).to_have_count(2, timeout=90_000)
            picker = board.locator(".widget-dropdown select")
            picker.select_option(index=1)
            expect(board.locator(".nbollama-slot-row")).to_have_count(6)
            picker.select_option(index=0)
            expect(board.locator(".nbollama-slot-row")).to_have_count(2)
            expect(board.locator(".nbollama-pinned")).to_have_text("pinned to 'small'")

            run_cell(page, 2)  # %nbollama use wide: the default moves, the pinned views stay
            wait_cell_done(page, 2)
            expect(select.locator("option").nth(1)).to_have_text(re.compile(r"\(default\)$"))
            expect(panel).to_have_attribute("data-shown", "small")
            expect(pin.locator(".nbollama-pin-text")).to_have_text("pinned to 'small'")
            expect(pin).to_have_attribute("title", re.compile(r"the default is 'wide'"))
            expect(board.locator(".nbollama-slot-row")).to_have_count(2)
            board.evaluate("e => e.scrollIntoView({block: 'start'})")  # the dashboard's pin in view
            main = page.locator("#jp-main-dock-panel").bounding_box()  # the notebook and the side panel
            page.screenshot(path=str(ARTIFACTS / "pinned-view.png"), clip={**main, "width": 1500 - main["x"]})

            pin.locator(".nbollama-follow-default").click()  # back to following the default
            expect(panel).to_have_attribute("data-shown", "wide")
            expect(panel).to_have_attribute("data-pinned", "")
            expect(pin).to_be_hidden()
            expect(panel.locator(".nbollama-slot-row")).to_have_count(6)
            board.locator(".nbollama-follow-default").click()
            expect(board.locator(".nbollama-slot-row")).to_have_count(6)
            expect(board.locator(".nbollama-pinned")).to_have_count(0)

            run_cell(page, 3)  # %nbollama use small: both follow it now
            wait_cell_done(page, 3)
            expect(panel).to_have_attribute("data-shown", "small")
            expect(panel.locator(".nbollama-slot-row")).to_have_count(2)
            expect(board.locator(".nbollama-slot-row")).to_have_count(2)
            page.screenshot(path=str(ARTIFACTS / "pinned-view-followed.png"))

            run_cell(page, 4)  # unloading the engine shown: the panel goes back to the default
            wait_cell_done(page, 4)
            expect(panel).to_have_attribute("data-shown", "wide")
            expect(select).to_be_hidden()
            expect(panel.locator(".nbollama-slot-row")).to_have_count(6)
        finally:
            shut_down_kernel(lab, "engines.ipynb")


# -- %%generate cells: their own highlighting -----------------------------------------------

HIGHLIGHT_CELLS = [
    "%%generate --max-tokens 64 --temperature 0.7 --out answers\n"
    "Is 7 a prime, and for what reason is it odd?\n---\nWrite a haiku about {topic} for 2 friends.",
    "for n in range(3):\n    if n is None and True:\n        print(42)",
]
#: per cell: its language, and each highlighted piece of text with its classes, line by line
JS_TOKENS = """cells => cells.map(cell => {
    const content = cell.querySelector('.cm-content');
    return {
        language: content.dataset.language,
        lines: [...content.querySelectorAll('.cm-line')].map(line =>
            [...line.querySelectorAll('span')].map(s => [s.textContent, s.className])),
        colour: getComputedStyle(content.querySelector('.cm-line')).color,
    };
})"""


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_a_generate_cell_highlights_its_options_and_leaves_its_prompts_plain(lab: LabServer) -> None:
    """The prompts of a ``%%generate`` cell carry no Python token (``and``, ``for``, ``is`` and
    numbers are plain text); its first line's magic and options have classes and colours of their
    own; a Python cell beside it stays Python, and turns into a prompt cell when typed into."""
    from playwright.sync_api import expect

    write_notebook(lab.root / "highlight.ipynb", HIGHLIGHT_CELLS)
    with chromium("highlight-failure.png") as (browser, errors):
        try:
            page, _ = open_with_panel(browser, lab, "highlight", errors)
            page.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').first.wait_for(timeout=120_000)
            cells = page.locator(CODE_CELLS)
            expect(cells.nth(0).locator(".cm-content")).to_have_attribute("data-language", "nbollama-generate")
            expect(cells.nth(1).locator(".cm-content")).to_have_attribute("data-language", "python")
            generate, python = cells.evaluate_all(JS_TOKENS)

            keyword = next(cls for text, cls in python["lines"][0] if text == "for")
            number = next(cls for text, cls in python["lines"][2] if text == "42")
            body = [piece for line in generate["lines"][1:] for piece in line]
            assert not [p for p in body if p[1] in (keyword, number)], body
            assert not [p for p in body if p[0].strip() in ("Is", "7", "and", "for", "is", "2")], body
            assert [t for t, c in body if "cm-nbollama-placeholder" in c] == ["{topic}"], body
            assert [t for t, c in body if "cm-nbollama-separator" in c] == ["---"], body
            first = generate["lines"][0]
            assert [t for t, c in first if "cm-nbollama-magic" in c] == ["%%generate"], first
            assert [t for t, c in first if "cm-nbollama-option" in c] == ["--max-tokens", "--temperature", "--out"], first
            option = cells.nth(0).locator(".cm-nbollama-option").first
            magic = cells.nth(0).locator(".cm-nbollama-magic")
            for styled in (option, magic):
                assert styled.evaluate("e => getComputedStyle(e).color") != generate["colour"]
            box0, box1 = cells.nth(0).bounding_box(), cells.nth(1).bounding_box()
            page.screenshot(
                path=str(ARTIFACTS / "generate-highlighting.png"),
                clip={"x": box0["x"], "y": box0["y"], "width": box0["width"],
                      "height": box1["y"] + box1["height"] - box0["y"]},
            )

            cells.nth(1).locator(".cm-content").click()  # typed into: the Python cell becomes prompts
            page.keyboard.press("Control+Home")
            page.keyboard.type("%%generate --seed 1")
            page.keyboard.press("Enter")
            expect(cells.nth(1).locator(".cm-content")).to_have_attribute("data-language", "nbollama-generate")
            expect(cells.nth(1).locator(".cm-nbollama-option")).to_have_text("--seed")
        finally:
            shut_down_kernel(lab, "highlight.ipynb")


# -- a remote engine in the panel ------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.timeout(600)
def test_panel_shows_a_remote_engines_slots(lab: LabServer, model_path: Path) -> None:
    """The panel on a kernel connected to a real llama-server: its 4 slots, this kernel's
    requests and another client's, the server's own figures; ``disconnect`` empties it."""
    import threading

    import httpx
    from playwright.sync_api import expect

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
        write_notebook(lab.root / "remote.ipynb", cells)
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

        other = threading.Thread(target=other_client, daemon=True)
        with chromium("panel-remote-failure.png") as (browser, errors):
            try:
                page, panel = open_with_panel(browser, lab, "remote", errors)
                run_first_cell(page)
                run_cell(page, 1)
                wait_cell_done(page, 1)
                assert "connected to llama-server" in cell_output(page, 1)

                rows = panel.locator(".nbollama-slot-row")
                expect(rows).to_have_count(4)
                expect(panel).to_have_attribute("data-kind", "llama-server")
                expect(panel.locator(".nbollama-remote-endpoint")).to_have_text(f"llama-server · {server.url}")
                expect(panel.locator(".nbollama-meta")).to_contain_text("server parallel 4")

                other.start()
                assert other_started.wait(120), "the other client never got a token"
                run_cell(page, 2)
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
                run_cell(page, 3)
                wait_cell_done(page, 3)
                expect(panel.locator(".nbollama-hint-code")).to_have_text("%nbollama load")
            finally:
                stop.set()
        other.join(30)
