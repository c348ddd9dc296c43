"""Model resolution and the GGUF checks that run before llama.cpp sees a file."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from nbollama import Engine, ModelLoadError, ModelNotFoundError
from nbollama.models import cache_dir, default_model_path, read_gguf_header, resolve_model


def test_default_model_is_assembled_into_the_cache(model_path: Path) -> None:
    assert model_path.parent == cache_dir()
    assert resolve_model(None) == model_path == resolve_model("default")
    header = read_gguf_header(model_path)
    assert header.architecture == "gemma3"
    assert header.data_size > 0 and header.n_tensors > 0


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    monkeypatch.setenv("NBOLLAMA_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    # the stamp makes the second call cheap; both give the same verified file
    first = default_model_path()
    assert first.parent == tmp_path and first.stat().st_size == model_path.stat().st_size
    assert default_model_path() == first


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError, match="nope.gguf: no such file"):
        Engine.load(missing)


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        Engine.load(tmp_path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    with pytest.raises(ModelLoadError, match=r"not a GGUF file \(starts with b'PK"):
        Engine.load(fake)


def test_truncated_gguf_is_caught_before_llama_cpp(tmp_path: Path, model_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with model_path.open("rb") as src:
        cut.write_bytes(src.read(model_path.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match="truncated GGUF file: its tensors need"):
        Engine.load(cut)


def test_header_cut_short(tmp_path: Path, model_path: Path) -> None:
    cut = tmp_path / "header.gguf"
    with model_path.open("rb") as src:
        cut.write_bytes(src.read(4096))
    with pytest.raises(ModelLoadError, match="the header ends early"):
        Engine.load(cut)


def test_corrupt_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    # valid magic and version, then a key whose length is absurd
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 2**60) + os.urandom(64))
    with pytest.raises(ModelLoadError, match="corrupt GGUF header"):
        Engine.load(bad)


def test_llama_cpp_rejection_is_reported_with_its_reason(tmp_path: Path, model_path: Path) -> None:
    """A whole-looking file that llama.cpp still refuses: the reason from its log is in the error."""
    data = bytearray(model_path.read_bytes())
    header = read_gguf_header(model_path)
    arch = b"gemma3"
    # rename the architecture everywhere in the metadata: same length, unknown to llama.cpp
    end = header.file_size - header.data_size
    data[:end] = bytes(data[:end]).replace(arch, b"zzzzz3")
    broken = tmp_path / "unknown-arch.gguf"
    broken.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as info:
        Engine.load(broken)
    assert str(broken) in str(info.value)
    assert "llama.cpp could not load it" in str(info.value)
    assert "zzzzz3" in str(info.value)


def _header(version: int, kvs: bytes, n_kv: int) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, 0, n_kv) + kvs


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_header(1, b"", 0), "unsupported GGUF version 1"),
        # general.alignment = 0.5 (float32)
        (_header(3, _key("general.alignment") + struct.pack("<If", 6, 0.5), 1), "general.alignment"),
        # arrays nested a thousand deep, each claiming one element
        (_header(3, _key("deep") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 1000, 1), "corrupt GGUF header"),
        # a string that claims a gigabyte in a tiny file
        (_header(3, _key("s") + struct.pack("<IQ", 8, 2**30), 1), "the header ends early"),
    ],
)
def test_hostile_headers_give_model_load_errors(tmp_path: Path, data: bytes, message: str) -> None:
    bad = tmp_path / "hostile.gguf"
    bad.write_bytes(data)
    with pytest.raises(ModelLoadError, match=message):
        read_gguf_header(bad)
