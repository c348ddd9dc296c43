"""``%nbollama`` and ``%%generate`` in an in-process IPython shell, on the real model: generating, the engine's life, the bench.

Displays are captured with IPython's own ``CapturingDisplayPublisher``: each
``display``/``update_display`` call is one recorded output, as a kernel would
send one ``display_data``/``update_display_data`` message.
"""

from __future__ import annotations

import _thread
import html
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from magic_displays import badge, card_text, cards

from nbollama import Engine, Result, session
from nbollama.magics import NbollamaMagics, StatusReport
from nbollama.magics._args import widgets_available as _widgets_available
from nbollama.results import BackgroundGeneration, Results

# -- generating ------------------------------------------------------------------------------


def test_generate_streams_and_returns_results(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    shell.user_ns["topic"] = "GPUs"
    body = 'Write a haiku about {topic}.\n---\nA JSON object: {"size": {unknown}, "n": [1, 2]}\n'
    value = shell.run_cell_magic("generate", "--max-tokens 48 --seed 1 --out answers", body)
    assert isinstance(value, Results) and shell.user_ns["answers"] is value
    assert [r.prompt for r in value] == [
        "Write a haiku about GPUs.",
        'A JSON object: {"size": {unknown}, "n": [1, 2]}',
    ]
    assert all(r.ok and r.completion_tokens == 48 for r in value)
    assert value.texts == [r.text for r in value]

    first, *updates = shown
    display_id = first["transient"]["display_id"]
    assert not first["update"] and all(u["update"] for u in updates)
    assert all(u["transient"]["display_id"] == display_id for u in updates)
    # streamed: the text grew over several updates, never one per token
    assert 2 <= len(updates) < 96
    texts = [card_text(cards(u["data"]["text/html"])[0]) for u in updates]
    assert len(set(texts)) >= 2 and texts[-1] == html.escape(value[0].text)
    final = updates[-1]["data"]
    assert [badge(c) for c in cards(final["text/html"])] == ["done", "done"]
    assert (
        "48 tokens" in final["text/html"]
        and "TTFT" in final["text/html"]
        and "tok/s" in final["text/html"]
    )
    assert "#2 [done · slot" in final["text/plain"]


def test_a_cell_run_twice_gives_the_same_texts(
    shell: InteractiveShell, kernel_engine: Engine
) -> None:
    assert kernel_engine.parallel == 4
    prompts = [
        "The capital of France is",
        "Name three colours:",
        "Once upon a time, in a small village,",
        "A good name for a cat is",
    ]
    line = "--temperature 0 --max-tokens 24 --quiet"
    first = shell.run_cell_magic("generate", line, "\n---\n".join(prompts))
    second = shell.run_cell_magic("generate", line, "\n---\n".join(prompts))
    assert [r.prompt for r in first] == prompts and first.ok
    assert first.texts == second.texts
    direct = kernel_engine.generate(prompts, temperature=0, max_tokens=24)
    assert [r.text for r in direct] == first.texts, "a cell is engine.generate() on its prompts"


def test_results_views(
    shell: InteractiveShell, kernel_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = shell.run_cell_magic(
        "generate", "--max-tokens 8 --quiet", "Name a colour.\n---\nName a fruit."
    )
    assert len(results) == 2 and isinstance(results[0], Result) and isinstance(results[:1], Results)
    assert results == list(results) and results.ok and results.completion_tokens == 16
    table = results._repr_html_()
    assert table.count("<tr>") == 3 and "Results: 2 results, 16 tokens (2 length)" in table
    assert repr(results).startswith("Results: 2 results, 16 tokens")
    frame = results.to_pandas()
    assert list(frame["prompt"]) == ["Name a colour.", "Name a fruit."]
    assert list(frame["text"]) == results.texts
    assert {"finish_reason", "completion_tokens", "ttft", "gen_tps", "slot"} <= set(frame.columns)


def test_model_text_and_prompts_are_html_escaped(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    results = shell.run_cell_magic(
        "generate",
        "--max-tokens 12 --temperature 0",
        "<ul>\n<li>Apples</li>\n<li><script>x</script>",
    )
    final = shown[-1]["data"]["text/html"]
    assert "<" in results[0].text, "the model should continue the HTML list"
    assert html.escape(results[0].text) in final
    assert "<li>" not in final and "<script>" not in final and "&lt;script&gt;" in final
    assert "<li>" not in results._repr_html_()


def test_each_fans_out_in_order(shell: InteractiveShell, kernel_engine: Engine) -> None:
    shell.user_ns["cities"] = ("Paris", "Rome", "Oslo")
    results = shell.run_cell_magic(
        "generate", "--each cities --max-tokens 4 --quiet", "The capital {item} has"
    )
    assert [r.prompt for r in results] == [
        "The capital Paris has",
        "The capital Rome has",
        "The capital Oslo has",
    ]
    line = shell.run_line_magic(
        "generate", "--each cities --max-tokens 2 --quiet --no-format {item} and {cities}"
    )
    assert [r.prompt for r in line] == [
        "Paris and {cities}",
        "Rome and {cities}",
        "Oslo and {cities}",
    ]


def test_lines_and_line_form(shell: InteractiveShell, kernel_engine: Engine) -> None:
    results = shell.run_cell_magic(
        "generate", "--lines --max-tokens 2 --quiet", "one\n\ntwo\nthree\n"
    )
    assert [r.prompt for r in results] == ["one", "two", "three"]
    single = shell.run_line_magic(
        "generate", "--max-tokens 3 --quiet --out quick What's a KV cache?"
    )
    assert [r.prompt for r in single] == ["What's a KV cache?"] and shell.user_ns["quick"] is single


def test_stop_system_and_chat_reach_the_engine(
    shell: InteractiveShell, kernel_engine: Engine
) -> None:
    raw = shell.run_line_magic("generate", "--max-tokens 2 --quiet Hello")
    system = shell.run_line_magic("generate", '--max-tokens 2 --quiet --system "Be brief." Hello')
    chat = shell.run_line_magic("generate", "--max-tokens 2 --quiet --chat Hello")
    assert raw[0].prompt_tokens < chat[0].prompt_tokens < system[0].prompt_tokens
    stopped = shell.run_cell_magic(
        "generate",
        "--temperature 0 --max-tokens 12 --stop '</li>' --quiet",
        "<ul>\n<li>Apples</li>\n<li>",
    )
    assert stopped[0].finish_reason == "stop" and "</li>" not in stopped[0].text


def test_quiet_and_markdown(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    shell.run_line_magic("generate", "--max-tokens 4 --quiet Hi")
    assert shown == []
    shell.run_line_magic("generate", "--max-tokens 4 --markdown Hi")
    final = shown[-1]
    assert final["update"] and set(final["data"]) == {"text/markdown", "text/plain"}
    assert "**\\#1 \\[done · slot" in final["data"]["text/markdown"]


def test_prompt_too_long_fails_in_its_own_area(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    body = "word " * 600 + "\n---\nName a colour."
    results = shell.run_cell_magic("generate", "--max-tokens 6", body)
    assert [r.finish_reason for r in results] == ["error", "length"]
    assert "one slot holds 512" in (results[0].error or "")
    too_long, fine = cards(shown[-1]["data"]["text/html"])
    assert (
        badge(too_long) == "error"
        and "nbollama-error" in too_long
        and "one slot holds 512" in too_long
    )
    assert badge(fine) == "done" and "nbollama-error" not in fine and "6 tokens" in fine


def test_background_returns_at_once_and_fills_out(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    shell.user_ns.pop("later", None)
    job = shell.run_cell_magic(
        "generate", "-b --max-tokens 48 --out later", "Once upon a time\n---\nIn a galaxy"
    )
    assert isinstance(job, BackgroundGeneration) and not job.done()
    assert shell.user_ns["later"] is job  # the handle until it is done
    assert "running" in repr(job) and "out='later'" in repr(job)
    other = shell.run_line_magic("generate", "-b --max-tokens 8 --quiet Meanwhile")
    results = job.wait(timeout=120)
    assert job.done() and job.result() is results and shell.user_ns["later"] is results
    assert [r.prompt for r in results] == ["Once upon a time", "In a galaxy"] and results.ok
    assert len(other.wait(timeout=120)) == 1
    display_id = shown[0]["transient"]["display_id"]
    mine = [o for o in shown if o["transient"]["display_id"] == display_id]
    assert len(mine) >= 3 and all(o["update"] for o in mine[1:])
    assert [badge(c) for c in cards(mine[-1]["data"]["text/html"])] == ["done", "done"]
    assert "done" in repr(job)


def test_background_cancel(shell: InteractiveShell, kernel_engine: Engine) -> None:
    job = shell.run_line_magic("generate", "-b --quiet --max-tokens 400 A long story:")
    while job.handles[0].completion_tokens < 2:
        assert not job.done()
        time.sleep(0.05)
    assert job.cancel() == 1
    results = job.wait(timeout=30)
    assert results[0].finish_reason == "cancelled" and 2 <= results[0].completion_tokens < 400
    assert job.cancel() == 0
    with pytest.raises(TimeoutError):
        BackgroundGeneration(job.handles).wait(timeout=0.1)


def test_ctrl_c_cancels_the_cell_and_keeps_the_partial_text(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    def interrupt_once_generating() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(
                s["state"] == "generating" and s["decoded_tokens"] >= 2
                for s in kernel_engine.snapshot()["slots"]
            ):
                _thread.interrupt_main()
                return
            time.sleep(0.05)

    shell.user_ns.pop("cut", None)
    interrupter = threading.Thread(target=interrupt_once_generating)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        shell.run_cell_magic(
            "generate", "--max-tokens 400 --out cut", "A long story about a dragon:\n---\nA poem:"
        )
    interrupter.join()
    cut = shell.user_ns["cut"]
    assert [r.finish_reason for r in cut] == ["cancelled", "cancelled"]
    assert 0 < cut.completion_tokens < 800
    final = cards(shown[-1]["data"]["text/html"])
    assert [badge(c) for c in final] == ["cancelled", "cancelled"] and card_text(final[0])
    after = shell.run_line_magic("generate", "--max-tokens 4 --quiet The end")
    assert after.ok


def shown_widget(output: dict[str, Any]) -> Any:
    """The live widget object behind a displayed widget view."""
    from ipywidgets.widgets.widget import _instances

    return _instances[output["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]]


@pytest.mark.skipif(not _widgets_available(), reason="nbollama.widgets is not there yet")
def test_watch_shows_a_compact_dashboard_first(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    shell.run_line_magic("generate", "--watch --max-tokens 4 Hi")
    board = shown_widget(shown[0])
    try:
        assert type(board).__name__ == "Dashboard" and board.compact and not board.following_session
        assert "nbollama-generate" in shown[1]["data"]["text/html"]
    finally:
        board.close()


@pytest.mark.skipif(not _widgets_available(), reason="nbollama.widgets is not there yet")
def test_dashboard_follows_the_kernel_engine(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    assert shell.run_line_magic("nbollama", "dashboard") is None
    board = shown_widget(shown[-1])
    try:
        assert type(board).__name__ == "Dashboard" and not board.compact and board.following_session
        assert board.parallel == kernel_engine.parallel
    finally:
        board.close()


def test_watch_and_dashboard_do_not_exist_without_widgets(
    shell: InteractiveShell, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(
        sys.modules, "nbollama.widgets", None
    )  # what `import` sees when it is absent
    assert not _widgets_available()
    shell.run_line_magic("nbollama", "help")
    shell.run_line_magic("generate", "--help")
    text = capsys.readouterr().out
    assert "dashboard" not in text and "--watch" not in text
    with pytest.raises(UsageError, match="unrecognized arguments: --watch"):
        shell.run_line_magic("generate", "--watch Hi")
    with pytest.raises(UsageError, match="invalid choice: 'dashboard'"):
        shell.run_line_magic("nbollama", "dashboard")


# -- the engine's life -----------------------------------------------------------------------


def test_generate_loads_the_default_model_when_none_is(
    shell: InteractiveShell, no_engine: None, capsys: pytest.CaptureFixture[str]
) -> None:
    results = shell.run_line_magic("generate", "--max-tokens 2 --quiet Hi")
    assert results.ok
    out = capsys.readouterr().out
    assert out.startswith("nbollama: no engine was loaded, so the bundled model was loaded: model=")
    assert out.count("\n") == 1
    engine = session.current_engine()
    assert engine is not None and f"parallel={engine.parallel}" in out


def test_load_status_unload(
    shell: InteractiveShell, no_engine: None, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_line_magic(
        "nbollama", f"load '{model_path}' --parallel 2 --ctx 128 --threads 1 --batch 64"
    )
    out, err = capsys.readouterr()
    engine = session.current_engine()
    assert engine is not None and (engine.parallel, engine.ctx, engine.n_batch) == (2, 128, 64)
    assert out == engine.summary + "\n" and "parallel=2 " in out and "(as asked)" in out and "kv=" in out
    assert "model=" not in err, "the summary is printed once"

    status = shell.run_line_magic("nbollama", "status")
    assert isinstance(status, StatusReport)
    page = status._repr_html_()
    assert page.count("<tr><td") == 2 and "2 slots × 128 ctx" in page and "KV cache" in page
    text = repr(status)
    assert "throughput" in text and "queue" in text and "memory" in text

    replaced = engine
    shell.run_line_magic("nbollama", "load --parallel 1 --ctx 64 --threads 1")
    assert replaced.closed and session.current_engine() is not None
    capsys.readouterr()
    shell.run_line_magic("nbollama", "unload")
    assert capsys.readouterr().out == "nbollama: engine closed, its memory freed\n"
    assert session.current_engine() is None
    shell.run_line_magic("nbollama", "unload")
    shell.run_line_magic("nbollama", "status")
    out = capsys.readouterr().out
    assert "no engine was loaded" in out and "no engine is loaded" in out


def test_load_errors_name_the_path_and_reason(
    shell: InteractiveShell, no_engine: None, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(
        UsageError, match=rf"%nbollama load: cannot load {re.escape(str(missing))}: no such file"
    ):
        shell.run_line_magic("nbollama", f"load {missing}")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UsageError, match=rf"cannot load {re.escape(str(junk))}: .*GGUF"):
        shell.run_line_magic("nbollama", f"load {junk}")
    assert session.current_engine() is None


def test_extension_load_twice_and_unload(
    shell: InteractiveShell, model_path: Path, no_engine: None
) -> None:
    from nbollama import load_ipython_extension, unload_ipython_extension

    load_ipython_extension(shell)
    load_ipython_extension(shell)
    assert (
        shell.find_line_magic("nbollama") is not None
        and shell.find_cell_magic("generate") is not None
    )
    engine = session.load(model_path, parallel=1, ctx=64, threads=1)
    try:
        unload_ipython_extension(shell)
        assert engine.closed and session.current_engine() is None
        assert shell.find_line_magic("nbollama") is None
        assert (
            shell.find_line_magic("generate") is None and shell.find_cell_magic("generate") is None
        )
        assert NbollamaMagics.__name__ not in shell.magics_manager.registry
        assert shell.find_line_magic("time") is not None, "IPython's own magics stay"
    finally:
        engine.close()
        load_ipython_extension(shell)


# -- %nbollama bench ------------------------------------------------------------------------


def test_bench_magic_sweeps_and_applies_the_recommendation(
    shell: InteractiveShell, shown: list[dict[str, Any]], no_engine: None
) -> None:
    shell.run_line_magic("nbollama", "load --parallel 1 --ctx 256")
    before = session.current_engine()
    assert before is not None
    result = shell.run_line_magic(
        "nbollama", "bench --parallel 2,1 --prompts 4 --max-tokens 4 --apply"
    )
    assert [r.parallel for r in result.rows] == [1, 2]
    assert any("application/vnd.plotly.v1+json" in out["data"] for out in shown)  # the figure
    after = session.current_engine()
    assert after is not None and after is not before and before.closed
    assert after.parallel == result.recommended and after.ctx == 256
    assert after.generate(["ok?"], max_tokens=2)[
        0
    ].ok  # the applied engine works on the same weights


@pytest.mark.parametrize(
    "bad", ["--parallel 0,2", "--parallel x", "--parallel ,", "--prompts 0", "--bogus"]
)
def test_bench_magic_rejects_bad_arguments(shell: InteractiveShell, bad: str) -> None:
    with pytest.raises(UsageError):
        shell.run_line_magic("nbollama", f"bench {bad}")


@pytest.mark.parametrize(
    "line, message",
    [
        ("load --parallel adaptive --min-tps 15 --max-ttft 2", "not both"),
        ("load --parallel 4 --min-tps 15", "--min-tps only apply with --parallel 'adaptive'"),
        ("load --parallel adaptive --max-parallel 0", "--max-parallel"),
        ("load --parallel adaptive --min-tps -3", "--min-tps"),
        ("load --parallel often", "'auto', 'adaptive' or a whole number"),
        ("load --reproducible --ctx 8", "ctx"),
    ],
)
def test_new_load_options_are_checked_before_any_load(
    shell: InteractiveShell, no_engine: None, line: str, message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        shell.run_line_magic("nbollama", line)
    assert session.current_engine() is None


