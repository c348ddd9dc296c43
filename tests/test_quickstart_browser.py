"""The quickstart notebook, run as a user runs it: Run All in JupyterLab, in Chromium.

Drives ``scripts/look_in_lab.py`` (imported by path): a ``jupyter lab`` with
``NBOLLAMA_QUICK=1``, the notebook opened, ``notebook:run-all-cells``, every
code cell waited for, the side panel opened, then the output areas scanned
for stderr, errors, empty plotly charts and widgets that never rendered.
Screenshots go to ``test-artifacts/look-quickstart/``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "01_quickstart.ipynb"
OUT = REPO / "test-artifacts" / "look-quickstart"


def _look_in_lab() -> ModuleType:
    name = "look_in_lab"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "look_in_lab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.browser
@pytest.mark.timeout(180)
def test_quickstart_runs_all_in_jupyterlab_without_a_problem() -> None:
    look = _look_in_lab()
    missing = look.missing_browser()
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + " -- CI must install it", pytrace=False)
        pytest.skip(reason)

    [report] = look.look_in_lab([QUICKSTART], OUT, quick=True, timeout_s=120)  # prints its report
    text = report.format()
    assert report.code_cells == 8, text
    assert report.cells_run == report.code_cells, text
    assert not report.problems, text
    shots = {p.name for p in report.screenshots}
    # the whole notebook, the dashboard (cell 6) and the %%generate cards (cell 8)
    assert {"01_quickstart.png", "01_quickstart-cell06.png", "01_quickstart-cell08.png"} <= shots, (
        text
    )
