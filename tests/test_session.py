"""Several named engines in one kernel, on the real model: shared weights, own parallelism, side-by-side cells."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from test_sources import GEMMA, _hf, _ollama, home  # noqa: F401  # `home`: the stores' fixture

from nbollama import Engine, ModelLoadError, session
from nbollama.magics._models import ModelsListing
from nbollama.magics._status import EnginesReport
from nbollama.results import Results

PROMPTS = ["The capital of France is", "Water boils at", "The three primary colours are"]


@pytest.fixture
def two(no_engine: None, shell: InteractiveShell) -> Iterator[tuple[Engine, Engine]]:
    """Engines "small" (parallel 2) and "wide" (parallel 4, q8_0) from the bundled GGUF, in reproducible
    mode (a text does not depend on what else ran), closed afterwards."""
    shell.run_line_magic("nbollama", "load --as small --parallel 2 --ctx 256 --reproducible")
    shell.run_line_magic("nbollama", "load --as wide --parallel 4 --ctx 256 --kv-type q8_0 --reproducible")
    small, wide = session.engine_named("small"), session.engine_named("wide")
    assert isinstance(small, Engine) and isinstance(wide, Engine)
    yield small, wide
    for name in list(session.engines()):
        session.unload(name)


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)


def test_two_engines_from_one_gguf_share_the_weights_and_keep_their_own_parallel(
    no_engine: None,
) -> None:
    first = session.load(name="a", parallel=2, ctx=256)
    first.generate(PROMPTS[:1], max_tokens=4, temperature=0.0)  # the weights are touched
    before = _rss()
    second = session.load(name="b", parallel=4, ctx=256)
    second.generate(PROMPTS[:1], max_tokens=4, temperature=0.0)
    grown = _rss() - before
    try:
        size = first.snapshot()["model"]["size_bytes"]
        assert first._weights is second._weights  # one copy, two borrowers
        assert grown < size / 3, f"RSS grew {grown} bytes; the weights are {size}"
        assert grown < second.kv_bytes + 96 * 2**20  # the KV cache and compute buffers only
        assert (first.parallel, second.parallel) == (2, 4)
        assert session.current_name() == "a" and list(session.engines()) == ["a", "b"]
        assert first.snapshot()["name"] == "a" and second.snapshot()["name"] == "b"
        assert second.generate(PROMPTS[:1], max_tokens=2)[0].model == "b"
    finally:
        session.unload("a")
        session.unload("b")


def test_unloading_one_leaves_the_other_serving_and_default(two: tuple[Engine, Engine], shell: InteractiveShell) -> None:
    small, wide = two
    assert session.current_name() == "small"  # the first one loaded stays the default
    shell.run_line_magic("nbollama", "unload small")
    assert small.closed and not wide.closed and session.current_name() == "wide"
    result = wide.generate(PROMPTS[:1], max_tokens=6, temperature=0.0)[0]
    assert result.ok and result.completion_tokens > 0  # the shared weights outlived small


def test_use_switches_the_default_and_status_lists_every_engine(
    two: tuple[Engine, Engine], shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    small, wide = two
    shell.run_line_magic("nbollama", "use wide")
    assert session.current_engine() is wide and "'wide' is the default" in capsys.readouterr().out
    report = shell.run_line_magic("nbollama", "status")
    assert isinstance(report, EnginesReport)
    text = repr(report)
    assert "small" in text and "wide (default)" in text and "q8_0" in text
    assert "<details open><summary>wide</summary>" in report._repr_html_()
    assert "engine 'small'" in repr(shell.run_line_magic("nbollama", "status small"))
    results = shell.run_cell_magic("generate", "--max-tokens 4 --quiet", PROMPTS[0])
    assert results[0].model == "wide"


def test_a_models_cell_gives_one_column_per_engine_equal_to_each_generate(
    two: tuple[Engine, Engine], shell: InteractiveShell, shown: list
) -> None:
    small, wide = two
    results = shell.run_cell_magic(
        "generate", "--models small,wide --max-tokens 8 --temperature 0 --out compared", "\n---\n".join(PROMPTS)
    )
    assert isinstance(results, Results) and shell.user_ns["compared"] is results
    assert [r.model for r in results] == ["small"] * 3 + ["wide"] * 3
    side = results.compare()
    assert list(side.columns) == ["small", "wide"] and list(side.index) == PROMPTS
    for name, engine in (("small", small), ("wide", wide)):
        expected = [r.text for r in engine.generate(PROMPTS, max_tokens=8, temperature=0.0)]
        assert list(side[name]) == expected
    frame = results.to_pandas()
    assert list(frame["model"]) == ["small"] * 3 + ["wide"] * 3
    figures = results.compare(["completion_tokens", "gen_tps"])
    assert figures.columns.nlevels == 2 and set(figures.columns.get_level_values(-1)) == {"small", "wide"}
    html = shown[-1]["data"]["text/html"]
    assert "nbollama-compare" in html and "small" in html and "wide" in html and "done" in html


def test_model_selects_one_engine(two: tuple[Engine, Engine], shell: InteractiveShell) -> None:
    results = shell.run_cell_magic("generate", "--model wide --max-tokens 4 --quiet", PROMPTS[1])
    assert results[0].model == "wide" and results.to_pandas()["model"].tolist() == ["wide"]


@pytest.mark.parametrize(
    ("kind", "line", "message"),
    [
        ("line", "use nope", r"%nbollama use: no engine named 'nope'; loaded: small, wide"),
        ("line", "unload nope", r"no engine named 'nope'"),
        ("line", "status nope", r"no engine named 'nope'"),
        ("line", "load --as 'a b'", r"'a b' is not an engine name"),
        ("cell", "--model nope", r"--model: no engine named 'nope'"),
        ("cell", "--models small", r"two or more engine names"),
        ("cell", "--models small,nope", r"--models: no engine named 'nope'"),
        ("cell", "--models small,wide --background", r"not with --background"),
    ],
)
def test_bad_engine_names_are_one_line_errors(
    two: tuple[Engine, Engine], shell: InteractiveShell, kind: str, line: str, message: str
) -> None:
    submitted = [e.snapshot()["totals"]["submitted"] for e in two]
    with pytest.raises(UsageError, match=message) as caught:
        if kind == "line":
            shell.run_line_magic("nbollama", line)
        else:
            shell.run_cell_magic("generate", line, "hello")
    assert "\n" not in str(caught.value)
    assert [e.snapshot()["totals"]["submitted"] for e in two] == submitted
    assert list(session.engines()) == ["small", "wide"]


def test_a_load_that_would_not_fit_says_so_before_loading(
    two: tuple[Engine, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session, "free_memory", lambda on_gpu: (64 * 2**20, "available RAM"))
    with pytest.raises(ModelLoadError, match=r"would not fit: it needs about .* and available RAM is 64.0 MiB; "
                       r"engines loaded: small \(.*\), wide \(.*\)") as caught:
        session.load(two[0].model_path, name="third", parallel=8, ctx=8192)
    assert "weights 0 B, shared" in str(caught.value)  # the file is loaded already: only KV is new
    assert list(session.engines()) == ["small", "wide"] and not two[0].closed


# -- where users keep their models -------------------------------------------------------------


def test_models_lists_an_ollama_store_and_load_resolves_its_name(
    home: Path, model_path: Path, no_engine: None, shell: InteractiveShell  # noqa: F811
) -> None:
    import os

    _ollama(Path(os.environ["OLLAMA_MODELS"]), GEMMA, model_path)
    listing = shell.run_line_magic("nbollama", "models")
    assert isinstance(listing, ModelsListing)
    entry = next(e for e in listing.entries if e.name == "gemma3:270m")
    assert entry.source == "ollama" and entry.quantisation == "Q4_K_M" and entry.architecture == "gemma3"
    assert "gemma3:270m" in repr(listing) and "gemma3:270m" in listing._repr_html_()
    shell.run_line_magic("nbollama", "load gemma3:270m --parallel 2 --ctx 256")
    engine = session.current_engine()
    assert isinstance(engine, Engine) and engine.model_path.name.startswith("sha256-")
    assert engine.generate(PROMPTS[:1], max_tokens=3)[0].ok
    with pytest.raises(UsageError, match=r"gemma3:27m.*gemma3:270m"):
        shell.run_line_magic("nbollama", "load gemma3:27m")
    assert session.current_engine() is engine  # a bad name leaves the engine in place


def test_load_resolves_a_hugging_face_cache_entry_offline(
    home: Path, model_path: Path, no_engine: None, shell: InteractiveShell  # noqa: F811
) -> None:
    import os

    _hf(Path(os.environ["HF_HUB_CACHE"]), "google/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf", model_path)
    shell.run_line_magic("nbollama", "load hf:google/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M.gguf --parallel 1 --ctx 256")
    engine = session.current_engine()
    assert isinstance(engine, Engine) and engine.model_name == "Gemma 3 270m"
    with pytest.raises(UsageError, match=r"not in the Hugging Face cache.*--download"):
        shell.run_line_magic("nbollama", "load hf:google/other-GGUF/x.gguf")



def test_a_load_resolves_the_name_once_and_reads_the_header_once(
    no_engine: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session resolves, the fit check and the engine are handed what was read."""
    from nbollama import sources

    reads: list[object] = []
    real = sources.read_gguf_header

    def counted(path: object) -> object:
        reads.append(path)
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(sources, "read_gguf_header", counted)
    engine = session.load(parallel=1, ctx=128)
    assert len(reads) == 1 and engine.model_path == reads[0]
