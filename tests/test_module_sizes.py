"""The size rule: no module in the package over 500 lines, no test or script over 600.

A module past the rule does more than one job; split it along the jobs (as ``_core`` and ``magics``
are split), rather than raise the limit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIMITS = {"nbollama": 500, "tests": 600, "scripts": 600, "benchmarks": 600}


def _too_long(folder: str, limit: int) -> list[str]:
    over = []
    for path in sorted((REPO / folder).rglob("*.py")):
        if "node_modules" in path.parts or "labextension" in path.parts:
            continue
        count = len(path.read_text(encoding="utf-8").splitlines())
        if count > limit:
            over.append(f"{path.relative_to(REPO)}: {count} lines (limit {limit})")
    return over


@pytest.mark.parametrize("folder", sorted(LIMITS))
def test_no_file_passes_its_size_limit(folder: str) -> None:
    over = _too_long(folder, LIMITS[folder])
    assert not over, "split these along their jobs:\n" + "\n".join(over)
