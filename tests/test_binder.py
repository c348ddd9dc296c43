"""binder/ follows repo2docker's rules, and its model step really assembles the model."""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
BINDER = REPO / "binder"


def test_only_files_repo2docker_reads() -> None:
    known = {"environment.yml", "postBuild", "apt.txt", "requirements.txt", "start", "runtime.txt"}
    present = {p.name for p in BINDER.iterdir()}
    assert present <= known, f"repo2docker ignores {present - known}"
    # with environment.yml present, repo2docker ignores requirements.txt: having both misleads
    assert not {"environment.yml", "requirements.txt"} <= present


def test_environment_yml_is_valid() -> None:
    env = yaml.safe_load((BINDER / "environment.yml").read_text())
    deps = env["dependencies"]
    assert all(isinstance(d, (str, dict)) for d in deps)
    names = {re.split(r"[=<>]", d)[0] for d in deps if isinstance(d, str)}
    assert {"python", "nodejs", "pip"} <= names  # node builds the labextension into the wheel


def test_post_build_is_an_executable_script_that_stops_on_errors() -> None:
    post = BINDER / "postBuild"
    assert post.stat().st_mode & stat.S_IXUSR, "repo2docker runs postBuild only if it is executable"
    text = post.read_text()
    assert text.startswith("#!/bin/bash") or text.startswith("#!/usr/bin/env bash")
    assert re.search(r"^set -e", text, re.M), "postBuild must stop at the first failing step"
    assert "pip install" in text and "default_model_path" in text


def test_post_build_model_step_assembles_the_model(tmp_path: Path) -> None:
    lines = [ln for ln in (BINDER / "postBuild").read_text().splitlines() if "default_model_path" in ln]
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert Path(argv[0]).name == "python"
    env = {**os.environ, "NBOLLAMA_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, text=True, check=True, timeout=300)
    assembled = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    assert str(assembled) in out.stdout
    with assembled.open("rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_readme_has_the_binder_badge() -> None:
    readme = (REPO / "README.md").read_text()
    assert "mybinder.org/badge_logo.svg" in readme
    assert "urlpath=lab/tree/examples/01_quickstart.ipynb" in readme
