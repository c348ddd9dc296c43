"""nbollama.build: the patches apply to the pinned llama-cpp-python, and the pin names the patched build."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nbollama import build

REPO = Path(__file__).resolve().parent.parent


def _pin() -> str:
    text = (REPO / ".ci" / "constraints.txt").read_text()
    match = re.search(r"(?m)^llama-cpp-python==(\S+)$", text)
    assert match, "no llama-cpp-python pin in .ci/constraints.txt"
    return match.group(1)


def test_the_pin_is_the_patched_build_of_its_version() -> None:
    pin = _pin()
    assert build.is_patched(pin) and pin == build.patched_version(build.public_version(pin)), (
        f"raise the pin with PATCH_LEVEL: .ci/constraints.txt has {pin}, "
        f"nbollama.build makes {build.patched_version(pin)}"
    )


def test_every_patch_is_documented() -> None:
    readme = (build.PATCHES / "README.md").read_text()
    assert build.patches(), "no patches shipped"
    for patch in build.patches():
        assert f"## {patch.name}" in readme


def test_the_patches_apply_to_the_pinned_sdist_and_set_the_version(tmp_path: Path) -> None:
    log = tmp_path / "log"
    root = build.patched_sources(_pin(), tmp_path, log)
    mmq = (root / "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp").read_text()
    assert "alignas(64) static const uint8_t tc[64]" in mmq and "_tile_loadconfig(tc);" in mmq
    assert f'__version__ = "{_pin()}"' in (root / "llama_cpp/__init__.py").read_text()


def test_a_patch_that_does_not_apply_stops_the_build(tmp_path: Path) -> None:
    root = build.download_sdist(_pin(), tmp_path, tmp_path / "log")
    for patch in build.patches():
        build._apply(patch, root, tmp_path / "log")  # applied once ...
    with pytest.raises(build.PatchDoesNotApply):  # ... a second time it cannot apply
        build._apply(build.patches()[0], root, tmp_path / "log")
