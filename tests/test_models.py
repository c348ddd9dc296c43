"""Model resolution and the GGUF checks that run before llama.cpp sees a file."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFWriter

from nbollama import Engine, ModelLoadError, ModelNotFoundError
from nbollama.models import (
    GGUFHeader,
    cache_dir,
    default_model_path,
    read_gguf_header,
)
from nbollama.sources import resolve_model


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


# -- the header reader: gguf's GGUFReader, fitted for a check on every load ---------------------------


def _tiny(path: Path, *, endianess: GGUFEndian = GGUFEndian.LITTLE, file_type: int | None = None) -> Path:
    """A small whole GGUF file written by gguf's own writer: arrays, strings, one F32 tensor."""
    writer = GGUFWriter(path, "llama", endianess=endianess)
    writer.add_name("tiny")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_tensor("w", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_a_small_file_reads_whole(tmp_path: Path, endianess: GGUFEndian) -> None:
    header = read_gguf_header(_tiny(tmp_path / "tiny.gguf", endianess=endianess))
    assert (header.name, header.architecture, header.version, header.n_tensors) == ("tiny", "llama", 3, 1)
    assert header.metadata["tokenizer.ggml.tokens"] == 3 == header.metadata["tokenizer.ggml.scores"]
    assert (header.data_size, header.parameters, header.quantisation) == (4 * 8 * 4, 32, None)


def test_bundled_model_quantisation_and_parameters(model_path: Path) -> None:
    header = read_gguf_header(model_path)
    assert header.quantisation == "Q4_K_M"
    assert header.parameters is not None and 250e6 < header.parameters < 290e6  # "270M"


@pytest.mark.parametrize(
    ("file_type", "name"), [(0, "F32"), (1, "F16"), (7, "Q8_0"), (15, "Q4_K_M"), (1024, None), (999, "type 999")]
)
def test_quantisation_names_follow_llama_cpp(file_type: int, name: str | None) -> None:
    header = GGUFHeader(Path("m.gguf"), 3, 0, {"general.file_type": file_type}, 0, 0)
    assert header.quantisation == name


def test_a_tensor_type_newer_than_gguf_is_not_refused(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "new-type.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", 1) + b"w") + 9 + 4 + 16  # name, n_dims, two dims: the type
    data[at : at + 4] = struct.pack("<I", 250)
    path.write_bytes(bytes(data))
    header = read_gguf_header(path)
    assert header.data_size == -1 and header.n_tensors == 1


def test_small_file_with_tensor_data_cut_off(tmp_path: Path) -> None:
    path = _tiny(tmp_path / "cut.gguf")
    path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ModelLoadError, match="its tensors need .* bytes, the file has .* interrupted download"):
        read_gguf_header(path)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")
def test_the_file_is_unmapped_and_closed_after_reading(tmp_path: Path, model_path: Path) -> None:
    """GGUFReader memory-maps the file: success or failure, nothing of it stays open."""
    whole = _tiny(tmp_path / "whole.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_path.read_bytes()[:4096])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_header(3, _key("general.alignment") + struct.pack("<If", 6, 0.5), 1))
    big = tmp_path / "big.gguf"  # the real model under a path of its own: engines may map the original
    try:
        os.link(model_path, big)
    except OSError:
        big.symlink_to(model_path)
    before = len(os.listdir("/proc/self/fd"))
    read_gguf_header(whole)
    read_gguf_header(big)
    for broken in (cut, bad):
        with pytest.raises(ModelLoadError) as info:
            read_gguf_header(broken)
        assert info.value.__context__ is None  # no traceback keeping the reader (and its map) alive
    assert len(os.listdir("/proc/self/fd")) == before
    maps = Path("/proc/self/maps").read_text()
    assert not any(str(p) in maps for p in (whole, cut, bad, big))
    for path in (whole, cut, bad):
        path.unlink()


def test_the_bundled_header_reads_fast(model_path: Path) -> None:
    """It runs on every load: GGUFReader as shipped takes ~16 s on this vocabulary."""
    best = min(_timed(read_gguf_header, model_path) for _ in range(3))
    assert best < 0.5, f"read_gguf_header took {best:.2f} s"


def _timed(function: Callable[[Path], object], path: Path) -> float:
    start = time.perf_counter()
    function(path)
    return time.perf_counter() - start
