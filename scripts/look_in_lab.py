"""Look at the teaching notebooks the way a user does: Run All in JupyterLab, in Chromium.

    .venv/bin/python scripts/look_in_lab.py [NOTEBOOK ...] [--out DIR] [--full] [--timeout S] [--strict]
    .venv/bin/python scripts/look_in_lab.py --readme [DIR]   # the README's screenshots, into docs/
    .venv/bin/python scripts/look_in_lab.py --url http://127.0.0.1:8888 --token T 01_quickstart.ipynb

``--url`` looks at notebooks on a JupyterLab that is already running (the one
``scripts/lab.sh`` started, say), as they are, named relative to its root
(``scripts/lab.sh`` serves ``examples/``).

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
``tests/test_quickstart_browser.py`` imports it by path. Its parts sit beside
it: ``look_lab`` (the server and the browser), ``look_page`` (Run All, waits,
``look_at``), ``look_scan`` (the output areas' scan and the report) and
``look_readme`` (``--readme``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# its parts beside it, however it is run or loaded (the quickstart test loads it by path)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from look_lab import (  # noqa: E402
    CHROMIUM,
    VIEWPORT,
    LabServer,
    chromium,
    copy_clean,
    lab_server,
    missing_browser,
    write_notebook,
)
from look_page import look_at  # noqa: E402
from look_readme import readme_screenshots  # noqa: E402
from look_scan import NotebookReport, Problem  # noqa: E402

__all__ = [
    "CHROMIUM",
    "LabServer",
    "NotebookReport",
    "Problem",
    "look_at",
    "look_in_lab",
    "main",
    "missing_browser",
    "readme_screenshots",
    "write_notebook",
]

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
DEFAULT_OUT = REPO / "test-artifacts" / "look"


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


def _served(lab: LabServer, name: Path) -> bool:
    """Whether the running server's contents API knows ``name`` (asked before Chromium starts)."""
    import httpx

    try:
        answer = httpx.get(
            f"{lab.url}/api/contents/{name.as_posix()}", params={"content": 0, "token": lab.token}
        )
    except httpx.TransportError as exc:
        raise SystemExit(f"no JupyterLab answers at {lab.url}: {exc}") from None
    return answer.status_code == 200


def _look_in_running_lab(
    url: str, token: str, names: list[Path], out: Path, args: argparse.Namespace
) -> int:
    """Run All on notebooks a running JupyterLab serves (names relative to its root)."""
    if not names:
        print(
            "--url needs the notebooks to look at, relative to the server's root", file=sys.stderr
        )
        return 2
    lab = LabServer(url=url.rstrip("/"), token=token, root=Path("."), log=out / "no-log")
    missing = [name for name in names if not _served(lab, name)]
    if missing:
        print(
            f"{lab.url} does not serve {', '.join(map(str, missing))}: name notebooks relative to the "
            "server's root (scripts/lab.sh serves examples/, so 01_quickstart.ipynb)",
            file=sys.stderr,
        )
        return 2
    reports = []
    with chromium() as browser:
        for name in names:
            context = browser.new_context(viewport=VIEWPORT)
            page = context.new_page()
            page.set_default_timeout(60_000)
            try:
                report = look_at(
                    page, lab, name.as_posix(), out, timeout_s=args.timeout, strict=args.strict
                )
            finally:
                context.close()
            print(report.format())
            reports.append(report)
    (out / "report.json").write_text(json.dumps([r.as_json() for r in reports], indent=1) + "\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
