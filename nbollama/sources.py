"""Where GGUF models already live on this machine, and which file a store name means.

Users keep models in Ollama's store, the Hugging Face cache or LM Studio's
folder; loading them from there spares a second copy of gigabytes. Names read
the way each tool writes them: ``gemma3:270m`` (Ollama), ``hf:ORG/REPO/FILE.gguf``
(Hugging Face). A listing never fails on one bad entry: the entry keeps the
reason in ``problem`` so a table can show it; resolving a name raises a
one-line ``ModelNotFoundError`` that says what is wrong and where.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .exceptions import ModelLoadError, ModelNotFoundError
from .models import (
    DEFAULT_MODEL,
    GGUFHeader,
    assembled_default_model,
    cache_dir,
    default_model_path,
    read_gguf_header,
)

__all__ = [
    "locate",
    "resolve_model",
    "Source",
    "ModelEntry",
    "OLLAMA_MODEL_MEDIA_TYPE",
    "find_models",
    "resolve_name",
    "is_store_name",
    "ollama_dir",
    "hf_cache_dir",
    "lmstudio_dirs",
]

Source = Literal["bundled", "ollama", "huggingface", "lmstudio", "folder"]

#: The manifest layer that holds the GGUF file (the others: template, system, params, license).
OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
_OLLAMA_HOST = "registry.ollama.ai"
_OLLAMA_LIBRARY = "library"
# Ollama's own rules for the parts of a name (server/internal/names).
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:_-]{0,349}")
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,79}")
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
_ORDER: dict[str, int] = {"bundled": 0, "ollama": 1, "huggingface": 2, "lmstudio": 3, "folder": 4}


@dataclass(frozen=True)
class ModelEntry:
    """One GGUF model found on disk, described from its header."""

    name: str  # what to type to load it: %nbollama load NAME, Engine.load(NAME)
    source: Source
    path: Path
    size: int  # bytes on disk (all shards of a split model)
    quantisation: str | None = None
    architecture: str | None = None
    parameters: int | None = None
    where: str = ""  # the store or folder, for people ("~/.ollama/models")
    problem: str | None = None  # why it cannot be loaded; None when it can

    @property
    def ok(self) -> bool:
        return self.problem is None


# -- where the stores are (read at call time: tests and users change the environment) --------------


def ollama_dir(home: Path | None = None) -> Path:
    """Ollama's store: ``$OLLAMA_MODELS``, else ``~/.ollama/models`` (else the Linux service's)."""
    configured = os.environ.get("OLLAMA_MODELS")
    if configured:
        return Path(configured).expanduser()
    mine = (home or Path.home()) / ".ollama" / "models"
    service = Path("/usr/share/ollama/.ollama/models")  # install.sh runs Ollama as user 'ollama'
    if home is None and not mine.is_dir() and service.is_dir():
        return service
    return mine


def hf_cache_dir(home: Path | None = None) -> Path:
    """The Hugging Face hub cache, by the variables ``huggingface_hub`` reads, in its order."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return _expand(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return _expand(os.environ["HF_HOME"]) / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return _expand(os.environ["XDG_CACHE_HOME"]) / "huggingface" / "hub"
    return (home or Path.home()) / ".cache" / "huggingface" / "hub"


def lmstudio_dirs(home: Path | None = None) -> list[Path]:
    """LM Studio's model folders: its home (``~/.lmstudio-home-pointer`` if moved)/models, and the old one."""
    home = home or Path.home()
    homes = [home / ".lmstudio"]
    try:
        pointed = (home / ".lmstudio-home-pointer").read_text(encoding="utf-8").strip()
        if pointed:
            homes.insert(0, Path(pointed).expanduser())
    except (OSError, UnicodeDecodeError):
        pass
    found = [h / "models" for h in homes] + [home / ".cache" / "lm-studio" / "models"]
    return list(dict.fromkeys(found))


def _expand(value: str) -> Path:
    return Path(os.path.expandvars(value)).expanduser()


def _tilde(path: Path) -> str:
    try:
        return "~/" + path.relative_to(Path.home()).as_posix()
    except ValueError:
        return str(path)


# -- names ---------------------------------------------------------------------------------------


def is_store_name(text: str) -> bool:
    """Whether ``text`` reads as a store name (``hf:...``, or one Ollama accepts), not a file path."""
    if text.startswith("hf:"):
        return True
    if text.endswith(".gguf") or text.startswith((".", "~")):
        return False
    return _parse_ollama(text) is not None


def _parse_ollama(name: str) -> tuple[str, str, str, str] | None:
    """``[host/][namespace/]model[:tag]`` -> its four parts, defaults filled in; None if not a name."""
    rest, tag = name, "latest"
    if name.rfind(":") > name.rfind("/"):
        rest, tag = name.rsplit(":", 1)
    parts = rest.split("/")
    if len(parts) == 1:
        parts = [_OLLAMA_HOST, _OLLAMA_LIBRARY, *parts]
    elif len(parts) == 2:
        parts = [_OLLAMA_HOST, *parts]
    if len(parts) != 3 or not _HOST.fullmatch(parts[0]):
        return None
    if not all(_PART.fullmatch(p) for p in (parts[1], parts[2], tag)):
        return None
    return parts[0], parts[1], parts[2], tag


def _ollama_display(host: str, namespace: str, model: str, tag: str) -> str:
    """The name as ``ollama list`` prints it: defaults left out."""
    if host != _OLLAMA_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace != _OLLAMA_LIBRARY:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def resolve_name(name: str, *, download: bool = False) -> Path:
    """The GGUF file a store name means: an Ollama blob or a Hugging Face cache file.

    ``download=True`` lets an ``hf:`` name missing from the cache be fetched
    with ``huggingface_hub.hf_hub_download``; nothing else ever goes online.
    """
    if name.startswith("hf:"):
        return _resolve_hf(name, download)
    parsed = _parse_ollama(name)
    if parsed is None:
        raise ModelNotFoundError(
            name, "not a file, nor a model name ([host/][namespace/]model[:tag])"
        )
    root = ollama_dir()
    display = _ollama_display(*parsed)
    manifest = root.joinpath("manifests", *parsed[:3], parsed[3])
    if not manifest.is_file():
        known = _ollama_manifests(root)
        by_lower = {n.lower(): m for n, m in known.items()}
        if display.lower() not in by_lower:  # Ollama matches names case-insensitively
            raise ModelNotFoundError(name, _unknown_name(display, root, list(known)))
        manifest = by_lower[display.lower()]
    blob, problem = _ollama_blob(manifest, root, display)
    if problem:
        raise ModelNotFoundError(display, problem)
    return blob


def locate(model: str | os.PathLike[str] | GGUFHeader | None, *, download: bool = False) -> GGUFHeader:
    """What the user typed, as the checked header of the GGUF file it means: resolved once, read once.

    ``None`` or ``"default"`` is the bundled model; an existing path is itself;
    a string that is no path and reads as a store name (``gemma3:270m``,
    ``user/model:tag``, ``hf:ORG/REPO/FILE.gguf``) is looked up where users
    already keep models. ``download=True`` lets an ``hf:`` name be fetched when
    it is not in the Hugging Face cache. A header given is returned as it is:
    callers pass down what they read.
    """
    if isinstance(model, GGUFHeader):
        return model
    name: str | None = None
    if model is None or str(model) == DEFAULT_MODEL:
        path = default_model_path()
    else:
        path = Path(model).expanduser()
        if isinstance(model, str) and not path.exists() and is_store_name(model):
            name = model
            path = resolve_name(model, download=download)
    if not path.exists():
        raise ModelNotFoundError(str(path), "no such file")
    if path.is_dir():
        raise ModelNotFoundError(str(path), "is a directory, not a .gguf file")
    try:
        return read_gguf_header(path)
    except ModelLoadError as exc:
        if name is None:
            raise
        raise ModelLoadError(f"{name} ({path})", exc.reason) from None


def resolve_model(model: str | os.PathLike[str] | None, *, download: bool = False) -> Path:
    """The path of the checked GGUF file ``model`` means (``locate``'s, for callers that want a path)."""
    return locate(model, download=download).path


def _unknown_name(display: str, root: Path, names: list[str]) -> str:
    if not root.is_dir():
        where = f"no Ollama store at {_tilde(root)} (set OLLAMA_MODELS if it is elsewhere)"
    else:
        where = f"no model {display} in the Ollama store ({_tilde(root)})"
    base = display.rsplit(":", 1)[0]
    close = [n for n in names if n.rsplit(":", 1)[0] == base]
    close += difflib.get_close_matches(display, names, n=3, cutoff=0.5)
    close += difflib.get_close_matches(display, _hf_names(hf_cache_dir()), n=3, cutoff=0.5)
    close = list(dict.fromkeys(close))[:5]
    hint = f"; closest: {', '.join(close)}" if close else ""
    return f"not a file, and {where}{hint}"


# -- Ollama --------------------------------------------------------------------------------------


def _ollama_manifests(root: Path) -> dict[str, Path]:
    """Every manifest under ``manifests/<host>/<namespace>/<model>/<tag>``, by display name."""
    found: dict[str, Path] = {}
    manifests = root / "manifests"
    if not manifests.is_dir():
        return found
    for path in sorted(manifests.glob("*/*/*/*")):
        if path.is_file() and not path.name.startswith("."):
            host, namespace, model, tag = path.relative_to(manifests).parts
            found[_ollama_display(host, namespace, model, tag)] = path
    return found


def _ollama_blob(manifest: Path, root: Path, name: str) -> tuple[Path, str | None]:
    """The model layer's blob, and what is wrong with the manifest or blob (None if nothing)."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except OSError as exc:
        return manifest, f"cannot read its manifest {manifest} ({exc.strerror})"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return manifest, f"corrupt manifest {manifest}: not JSON ({exc})"
    if not isinstance(data, dict) or data.get("schemaVersion") != 2:
        version = data.get("schemaVersion") if isinstance(data, dict) else None
        return manifest, f"corrupt manifest {manifest}: schemaVersion {version!r}, expected 2"
    layers = data.get("layers")
    models = [
        layer
        for layer in (layers if isinstance(layers, list) else [])
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE
    ]
    if not models:
        return manifest, f"corrupt manifest {manifest}: no layer of type {OLLAMA_MODEL_MEDIA_TYPE}"
    digest = models[0].get("digest")
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if match is None:
        return (
            manifest,
            f"corrupt manifest {manifest}: model digest {digest!r} is not sha256:<64 hex>",
        )
    blob = root / "blobs" / f"sha256-{match.group(1)}"
    if not blob.is_file() and (root / "blobs" / f"sha256:{match.group(1)}").is_file():
        blob = root / "blobs" / f"sha256:{match.group(1)}"  # older Ollama versions
    if not blob.is_file():
        return (
            blob,
            f"its model blob is missing: {blob} (manifest {manifest}); `ollama pull {name}` restores it",
        )
    expected, actual = models[0].get("size"), blob.stat().st_size
    if isinstance(expected, int) and expected != actual:
        return blob, (
            f"its model blob {blob} has {actual} bytes, the manifest says {expected} "
            "(an interrupted pull?)"
        )
    return blob, None


def _ollama_entries(root: Path) -> list[ModelEntry]:
    entries = []
    where = _tilde(root)
    for display, manifest in _ollama_manifests(root).items():
        blob, problem = _ollama_blob(manifest, root, display)
        if problem:
            entries.append(ModelEntry(display, "ollama", blob, 0, where=where, problem=problem))
        else:
            entries.append(_describe(display, "ollama", blob, blob.stat().st_size, where))
    return entries


# -- Hugging Face --------------------------------------------------------------------------------


def _hf_files(cache: Path) -> list[tuple[str, Path, int]]:
    """``(hf:ORG/REPO/FILE.gguf, snapshot path, size)`` for each GGUF file in the cache's model repos."""
    if not cache.is_dir():
        return []
    from huggingface_hub import scan_cache_dir  # imported when used: the hub is not needed to load

    try:
        info = scan_cache_dir(cache)
    except (OSError, ValueError):
        return []
    found: list[tuple[str, Path, int]] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        files: dict[str, tuple[Path, int]] = {}
        # the revision main points at wins, then the newest
        for revision in sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified)):
            for file in revision.files:
                relative = file.file_path.relative_to(revision.snapshot_path).as_posix()
                if relative.endswith(".gguf"):
                    files[relative] = (file.file_path, file.size_on_disk)
        for relative, (path, size) in sorted(files.items()):
            found.append((f"hf:{repo.repo_id}/{relative}", path, size))
    return found


def _hf_names(cache: Path) -> list[str]:
    return [name for name, _, _ in _hf_files(cache)]


def _resolve_hf(name: str, download: bool) -> Path:
    parts = name.removeprefix("hf:").split("/")
    if len(parts) < 3 or not all(parts) or not parts[-1].endswith(".gguf"):
        raise ModelNotFoundError(name, "a Hugging Face name reads hf:ORG/REPO/FILE.gguf")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    cache = hf_cache_dir()
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
    except ValueError as exc:  # a file name that climbs out of the repo, a bad repo id
        raise ModelNotFoundError(name, f"not a valid Hugging Face file name ({exc})") from None
    if isinstance(found, str):
        return Path(found)
    # downloaded at a pinned revision, so no refs/main: any snapshot holding the file
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    held = [s / filename for s in snapshots.glob("*") if (s / filename).is_file()]
    if held:
        return max(held, key=lambda p: p.stat().st_mtime)
    if download:
        return _download_hf(name, repo_id, filename, cache)
    close = difflib.get_close_matches(name, _hf_names(cache), n=3, cutoff=0.5)
    hint = f"; closest cached: {', '.join(close)}" if close else ""
    raise ModelNotFoundError(
        name,
        f"not in the Hugging Face cache ({_tilde(cache)}); pass --download (download=True) "
        f"to fetch it, or run: hf download {repo_id} {filename}{hint}",
    )


def _download_hf(name: str, repo_id: str, filename: str, cache: Path) -> Path:  # pragma: no cover
    """Fetch into the cache: only on an explicit ``download=True`` (no test goes online)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache))
    except Exception as exc:  # offline, no such repo or file, gated, network: one line all the same
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(name, f"download failed: {first}") from None


# -- listing -------------------------------------------------------------------------------------


_described: dict[tuple[str, int, int], tuple[str | None, str | None, int | None, str | None]] = {}


def _describe(name: str, source: Source, path: Path, size: int, where: str) -> ModelEntry:
    """An entry with what the header says; a bad header becomes the entry's problem."""
    try:
        st = path.stat()
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in _described:  # blobs do not change under a name: read each header once
            try:
                header = read_gguf_header(path)
                parameters = header.parameters
                _described[key] = (header.quantisation, header.architecture, parameters, None)
            except ModelLoadError as exc:
                _described[key] = (None, None, None, exc.reason)
        quantisation, architecture, parameters, problem = _described[key]
    except OSError as exc:
        quantisation = architecture = None
        parameters = None
        problem = f"cannot read {path} ({exc.strerror})"
    return ModelEntry(
        name, source, path, size, quantisation, architecture, parameters, where, problem
    )


def _gguf_files(folder: Path, pattern: str) -> list[tuple[Path, int]]:
    """GGUF files in a folder, a split model as its first shard with the size of all shards."""
    found = []
    for path in sorted(folder.glob(pattern)):
        shard = _SHARD.search(path.name)
        if not path.is_file() or (shard and shard.group(1) != "00001"):
            continue
        size = path.stat().st_size
        if shard:
            stem = path.name[: shard.start()]
            siblings = path.parent.glob(f"{stem}-*-of-{shard.group(2)}.gguf")
            size = sum(s.stat().st_size for s in siblings if s.is_file())
        found.append((path, size))
    return found


def find_models(
    folders: Iterable[str | os.PathLike[str]] = (), *, home: Path | None = None
) -> list[ModelEntry]:
    """Every GGUF model in the known stores and in ``folders`` (searched recursively).

    The bundled model is listed only if already assembled. A store that is not
    there is empty; a broken entry is listed with its ``problem``. ``home``
    stands in for the user's home directory (tests); environment variables
    (``OLLAMA_MODELS``, ``HF_HUB_CACHE``, ...) still win, as they do for each tool.
    """
    entries: list[ModelEntry] = []
    bundled = assembled_default_model()
    if bundled is not None:
        where = f"bundled ({_tilde(cache_dir())})"
        entries.append(_describe("default", "bundled", bundled, bundled.stat().st_size, where))
    entries += _ollama_entries(ollama_dir(home))
    cache = hf_cache_dir(home)
    for name, path, size in _hf_files(cache):
        entries.append(_describe(name, "huggingface", path, size, _tilde(cache)))
    for folder in lmstudio_dirs(home):
        for path, size in _gguf_files(folder, "*/*/*.gguf"):  # <publisher>/<repo>/<file>
            entries.append(_describe(_tilde(path), "lmstudio", path, size, _tilde(folder)))
    for given in folders:
        folder = Path(given).expanduser()
        for path, size in _gguf_files(folder, "**/*.gguf"):
            entries.append(_describe(_tilde(path), "folder", path, size, _tilde(folder)))
    seen: set[str] = set()
    unique = []
    for entry in entries:  # the same file twice (a folder inside a store): the store's entry stays
        real = os.path.realpath(entry.path)
        if real not in seen or entry.problem:
            seen.add(real)
            unique.append(entry)
    return sorted(unique, key=lambda e: (_ORDER[e.source], e.name))


# -- display -------------------------------------------------------------------------------------
