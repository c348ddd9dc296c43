"""Models where users already keep them: Ollama's store, the Hugging Face cache, LM Studio, folders.

Each store is laid out in a temporary directory as its tool lays it out, its
GGUF files hard links to the bundled model (symlinks across file systems):
nothing is copied, nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from nbollama import ModelLoadError, ModelNotFoundError
from nbollama.magics._models import format_models_table, models_html
from nbollama.models import read_gguf_header
from nbollama.sources import (
    OLLAMA_MODEL_MEDIA_TYPE,
    ModelEntry,
    find_models,
    hf_cache_dir,
    is_store_name,
    lmstudio_dirs,
    ollama_dir,
    resolve_model,
    resolve_name,
)

_STORE_VARIABLES = (
    "OLLAMA_MODELS",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HOME",
    "XDG_CACHE_HOME",
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home, every store variable pointing into it or unset, the hub offline."""
    for variable in _STORE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def _link(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system
        target.symlink_to(source)
    return target


def _digest(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()  # nothing checks it is the file's


def _ollama(
    root: Path,
    parts: tuple[str, str, str, str],
    model: Path | None,
    *,
    label: str | None = None,
    manifest: str | None = None,
) -> Path:
    """A manifest as `ollama pull` writes it; its model layer a link to ``model`` (None: no blob)."""
    label = label or "/".join(parts)
    digest = _digest(label)
    config = _digest(label + "config")
    layers = [
        {"mediaType": OLLAMA_MODEL_MEDIA_TYPE, "digest": f"sha256:{digest}", "size": 0},
        {
            "mediaType": "application/vnd.ollama.image.template",
            "digest": f"sha256:{_digest(label + 't')}",
            "size": 10,
        },
    ]
    if model is not None:
        layers[0]["size"] = model.stat().st_size
        _link(model, root / "blobs" / f"sha256-{digest}")
    path = root.joinpath("manifests", *parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": f"sha256:{config}",
            "size": 2,
        },
        "layers": layers,
    }
    path.write_text(manifest if manifest is not None else json.dumps(body))
    return root / "blobs" / f"sha256-{digest}"


def _hf(cache: Path, repo_id: str, filename: str, model: Path, *, main: bool = True) -> Path:
    """``models--ORG--REPO`` as huggingface_hub lays it out: refs, a snapshot symlink, the blob."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = _digest(repo_id)[:40]
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    blob = _link(model, repo / "blobs" / _digest(repo_id + filename))
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    return snapshot


def _by_name(entries: list[ModelEntry]) -> dict[str, ModelEntry]:
    return {e.name: e for e in entries}


GEMMA = ("registry.ollama.ai", "library", "gemma3", "270m")


# -- Ollama ----------------------------------------------------------------------------------------


def test_ollama_model_is_listed_and_resolved(home: Path, model_path: Path) -> None:
    root = ollama_dir()
    blob = _ollama(root, GEMMA, model_path)
    entry = _by_name(find_models(home=home))["gemma3:270m"]
    assert (entry.source, entry.path, entry.size) == ("ollama", blob, model_path.stat().st_size)
    assert (entry.quantisation, entry.architecture, entry.ok) == ("Q4_K_M", "gemma3", True)
    assert entry.parameters is not None and 200e6 < entry.parameters < 300e6
    assert str(root) in entry.where or entry.where.startswith("~")
    assert resolve_model("gemma3:270m") == blob
    assert read_gguf_header(resolve_model("gemma3:270m")).architecture == "gemma3"


def test_a_name_without_tag_means_latest(home: Path, model_path: Path) -> None:
    root = ollama_dir()
    _ollama(root, GEMMA, model_path)
    latest = _ollama(root, (*GEMMA[:3], "latest"), model_path)
    assert resolve_model("gemma3") == latest == resolve_name("gemma3:latest")
    assert resolve_model("GEMMA3:Latest") == latest  # Ollama matches names case-insensitively


def test_user_namespaces_and_other_registries(home: Path, model_path: Path) -> None:
    root = ollama_dir()
    mine = _ollama(root, ("registry.ollama.ai", "alice", "tiny", "q4"), model_path)
    hub = ("hf.co", "unsloth", "gemma-3-270m-it-GGUF", "Q4_K_M")
    theirs = _ollama(root, hub, model_path)
    names = _by_name(find_models(home=home))
    assert names["alice/tiny:q4"].path == mine
    assert names["hf.co/unsloth/gemma-3-270m-it-GGUF:Q4_K_M"].path == theirs
    assert resolve_model("alice/tiny:q4") == mine
    assert resolve_model("hf.co/unsloth/gemma-3-270m-it-GGUF:Q4_K_M") == theirs


def test_an_unknown_name_suggests_the_closest(home: Path, model_path: Path) -> None:
    _ollama(ollama_dir(), GEMMA, model_path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("gemma3:27m")
    message = str(info.value)
    assert "\n" not in message
    assert "no model gemma3:27m in the Ollama store" in message
    assert "closest: gemma3:270m" in message
    with pytest.raises(ModelNotFoundError, match=r"gemma3:latest.*closest: gemma3:270m"):
        resolve_model("gemma3")


def test_no_ollama_store_is_said_plainly(home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="not a file, and no Ollama store at .*OLLAMA_MODELS"):
        resolve_model("llama3.2:1b")
    assert [e for e in find_models(home=home) if e.source == "ollama"] == []


def test_a_missing_blob_is_named_and_does_not_break_the_listing(
    home: Path, model_path: Path
) -> None:
    root = ollama_dir()
    _ollama(root, GEMMA, model_path)
    blob = _ollama(root, (*GEMMA[:3], "gone"), None)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("gemma3:gone")
    assert "\n" not in str(info.value)
    assert f"its model blob is missing: {blob}" in str(info.value)
    names = _by_name(find_models(home=home))
    assert names["gemma3:270m"].ok
    assert names["gemma3:gone"].problem is not None and str(blob) in names["gemma3:gone"].problem


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("{not json", "not JSON"),
        (json.dumps({"schemaVersion": 2, "layers": []}), f"no layer of type {OLLAMA_MODEL_MEDIA_TYPE}"),
        (json.dumps({"schemaVersion": 1}), "schemaVersion 1, expected 2"),
        (
            json.dumps(
                {"schemaVersion": 2, "layers": [{"mediaType": OLLAMA_MODEL_MEDIA_TYPE, "digest": "../x"}]}
            ),
            "is not sha256:<64 hex>",
        ),
    ],
)
def test_a_corrupt_manifest_is_named_and_does_not_break_the_listing(
    home: Path, model_path: Path, manifest: str, message: str
) -> None:
    root = ollama_dir()
    _ollama(root, GEMMA, model_path)
    _ollama(root, (*GEMMA[:3], "bad"), model_path, manifest=manifest)
    path = root / "manifests" / "registry.ollama.ai" / "library" / "gemma3" / "bad"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("gemma3:bad")
    assert "\n" not in str(info.value)
    assert f"corrupt manifest {path}" in str(info.value) and message in str(info.value)
    names = _by_name(find_models(home=home))
    assert names["gemma3:270m"].ok and message in (names["gemma3:bad"].problem or "")


def test_a_truncated_blob_is_reported_with_the_name(
    home: Path, tmp_path: Path, model_path: Path
) -> None:
    cut = tmp_path / "cut.gguf"
    with model_path.open("rb") as src:
        cut.write_bytes(src.read(1 << 20))
    _ollama(ollama_dir(), (*GEMMA[:3], "cut"), cut)
    with pytest.raises(ModelLoadError, match=r"^gemma3:cut \(.*sha256-.*\): truncated GGUF file"):
        resolve_model("gemma3:cut")
    entry = _by_name(find_models(home=home))["gemma3:cut"]
    assert entry.problem is not None and entry.problem.startswith("truncated GGUF file")


# -- Hugging Face ----------------------------------------------------------------------------------


def test_hugging_face_cache_is_listed_and_resolved(home: Path, model_path: Path) -> None:
    cache = hf_cache_dir()
    assert cache == home.parent / "hf"
    top = _hf(cache, "unsloth/gemma-3-270m-it-GGUF", "gemma-3-270m-it-Q4_K_M.gguf", model_path)
    nested = _hf(cache, "bartowski/gemma-GGUF", "Q4_K_M/gemma-Q4_K_M.gguf", model_path)
    (top.parent / "README.md").write_text("not a model")
    names = _by_name(find_models(home=home))
    name = "hf:unsloth/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf"
    assert names[name].source == "huggingface"
    assert (names[name].quantisation, names[name].size) == ("Q4_K_M", model_path.stat().st_size)
    assert not any(n.endswith("README.md") for n in names)
    assert resolve_model(name) == top
    assert resolve_model("hf:bartowski/gemma-GGUF/Q4_K_M/gemma-Q4_K_M.gguf") == nested
    assert read_gguf_header(resolve_model(name)).architecture == "gemma3"


def test_a_pinned_revision_without_refs_main_resolves(home: Path, model_path: Path) -> None:
    snapshot = _hf(hf_cache_dir(), "org/pinned", "m.gguf", model_path, main=False)
    assert resolve_name("hf:org/pinned/m.gguf") == snapshot


def test_hugging_face_name_not_cached_says_how_to_get_it(home: Path, model_path: Path) -> None:
    _hf(hf_cache_dir(), "unsloth/gemma-3-270m-it-GGUF", "gemma-3-270m-it-Q4_K_M.gguf", model_path)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("hf:unsloth/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q8_0.gguf")
    message = str(info.value)
    assert "\n" not in message
    assert "not in the Hugging Face cache" in message and "--download" in message
    assert "hf download unsloth/gemma-3-270m-it-GGUF gemma-3-270m-it-Q8_0.gguf" in message
    assert "closest cached: hf:unsloth/gemma-3-270m-it-GGUF/gemma-3-270m-it-Q4_K_M.gguf" in message
    with pytest.raises(ModelNotFoundError, match="hf:ORG/REPO/FILE.gguf"):
        resolve_model("hf:just-a-repo")


# -- LM Studio, folders, the bundled model -----------------------------------------------------------


def test_lm_studio_folders_are_listed(home: Path, tmp_path: Path, model_path: Path) -> None:
    new = _link(model_path, home / ".lmstudio/models/lmstudio-community/gemma-3-GGUF/g-Q4_K_M.gguf")
    old = _link(model_path, home / ".cache/lm-studio/models/TheBloke/old-GGUF/old.Q4_K_M.gguf")
    entries = [e for e in find_models(home=home) if e.source == "lmstudio"]
    assert {e.path for e in entries} == {new, old}
    assert all(e.quantisation == "Q4_K_M" and e.ok for e in entries)
    assert all(resolve_model(e.name) == e.path for e in entries)  # the name is the path
    moved = tmp_path / "elsewhere"
    (home / ".lmstudio-home-pointer").write_text(str(moved))
    assert lmstudio_dirs(home)[0] == moved / "models"


def test_folders_split_models_and_broken_files(home: Path, tmp_path: Path, model_path: Path) -> None:
    folder = tmp_path / "mine"
    _link(model_path, folder / "deep" / "a.gguf")
    for i in (1, 2):
        _link(model_path, folder / f"big-0000{i}-of-00002.gguf")
    (folder / "fake.gguf").write_bytes(b"PK\x03\x04 a zip")
    names = _by_name(find_models([folder], home=home))
    size = model_path.stat().st_size
    split = names[str(folder / "big-00001-of-00002.gguf")]
    assert split.size == 2 * size and str(folder / "big-00002-of-00002.gguf") not in names
    assert names[str(folder / "deep" / "a.gguf")].ok
    assert "not a GGUF file" in (names[str(folder / "fake.gguf")].problem or "")


def test_the_bundled_model_is_listed_when_assembled(home: Path, model_path: Path) -> None:
    default = _by_name(find_models(home=home))["default"]
    assert (default.source, default.path, default.quantisation) == ("bundled", model_path, "Q4_K_M")


def test_names_and_paths_are_told_apart() -> None:
    assert is_store_name("gemma3:270m") and is_store_name("alice/tiny") and is_store_name("hf:o/r/f.gguf")
    assert not is_store_name("model.gguf") and not is_store_name("./gemma3")
    assert not is_store_name("~/models/x") and not is_store_name("/abs/path")


def test_a_missing_gguf_path_is_still_no_such_file(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="no such file"):
        resolve_model(tmp_path / "gemma3")  # a Path is a path, never a name


# -- display -------------------------------------------------------------------------------------


def test_table_and_html(home: Path, model_path: Path) -> None:
    root = ollama_dir()
    _ollama(root, GEMMA, model_path)
    _ollama(root, (*GEMMA[:3], "gone"), None)
    entries = [e for e in find_models(home=home) if e.source == "ollama"]
    table = format_models_table(entries)
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "QUANT", "ARCH", "SOURCE", "WHERE"]
    row = next(line for line in lines if line.startswith("gemma3:270m"))
    assert "241.4 MiB" in row and "Q4_K_M" in row and "gemma3" in row and "ollama" in row
    assert lines[0].index("SIZE") == row.index("241.4 MiB")  # aligned columns
    assert any(line.startswith("! gemma3:gone: its model blob is missing") for line in lines)
    page = models_html(entries)
    assert page.startswith("<table") and "<th style='text-align:left'>QUANT</th>" in page
    assert "gemma3:270m" in page and "its model blob is missing" in page
    odd = ModelEntry("<b>x</b>", "folder", Path("/x"), 1, where="<here>")
    assert "&lt;b&gt;x&lt;/b&gt;" in models_html([odd]) and "<b>" not in models_html([odd])
    assert format_models_table([]) == "no GGUF models found"
