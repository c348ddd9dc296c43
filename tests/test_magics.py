"""``%nbollama`` and ``%%generate`` in an in-process IPython shell, on the real model.

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
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nbollama import Engine, Result, session
from nbollama.engine import SamplingParams
from nbollama.magics import NbollamaMagics, StatusReport, interpolate, split_prompts
from nbollama.magics._args import widgets_available as _widgets_available
from nbollama.magics._parse_generate import (
    GenerateCall,
    GenerateHelpCall,
    _generate_parser,
    _split_line_form,
    parse_generate,
)
from nbollama.magics._parse_nbollama import (
    BenchCall,
    HelpCall,
    LoadCall,
    StatusCall,
    UnloadCall,
    parse_nbollama,
)
from nbollama.results import BackgroundGeneration, Results

# -- fixtures ------------------------------------------------------------------------------


def cards(html_text: str) -> list[str]:
    return html_text.split('<div class="nbollama-card"')[1:]


def badge(card: str) -> str:
    match = re.search(r'class="nbollama-badge"[^>]*>([^<]*)<', card)
    assert match
    return match.group(1)


def card_text(card: str) -> str:
    match = re.search(r'class="nbollama-text"[^>]*>(.*?)</div>', card, re.S)
    assert match
    return match.group(1)


# -- prompts: splitting and filling --------------------------------------------------------


def test_split_on_dash_lines() -> None:
    body = "\nFirst prompt\nstill first\n---\n  ---  \n\n    indented second\n---\n\n"
    assert split_prompts(body) == ["First prompt\nstill first", "    indented second"]
    assert split_prompts("a --- b\n--- not a separator\n") == ["a --- b\n--- not a separator"]
    assert split_prompts("\n---\n \n") == []


def test_split_lines() -> None:
    assert split_prompts("one\n\n  two  \n---\nthree\n", lines=True) == ["one", "two", "three"]


def test_interpolate_known_and_unknown_names() -> None:
    ns = {"topic": "GPUs", "n": 3}
    assert interpolate("Write {n} haikus about {topic}.", ns) == "Write 3 haikus about GPUs."
    assert interpolate("About {missing} and {topic}", ns) == "About {missing} and GPUs"
    assert interpolate("{item} {topic}", ns, {"item": "x", "topic": "y"}) == "x y"


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "x", "tags": ["a", "b"], "nested": {"k": 1}}',
        "def f():\n    return {x: y for x, y in pairs}",
        "{{topic}} is a template placeholder",
        "{topic.upper} {topic[0]} {0} {} {topic!r} { topic }",
        "fn main() { let v = vec![1]; }",
    ],
)
def test_interpolate_leaves_code_and_json_byte_identical(text: str) -> None:
    ns = {"topic": "GPUs", "x": 1, "y": 2, "pairs": [], "let": 0}
    assert interpolate(text, ns) == text


def test_line_form_splits_options_from_a_verbatim_prompt() -> None:
    spec = _generate_parser(line=True)
    assert _split_line_form("--max-tokens 8 --seed=2 -b What's a 'KV cache'?", spec) == (
        ["--max-tokens", "8", "--seed=2", "-b"],
        "What's a 'KV cache'?",
    )
    assert _split_line_form('--stop "a b" -- --not an option', spec) == (
        ["--stop", "a b"],
        "--not an option",
    )
    assert _split_line_form("-5 is a number", spec) == ([], "-5 is a number")
    assert _split_line_form("   ", spec) == ([], "")


# -- the parse layer, without a model ---------------------------------------------------------


def test_parse_generate_fills_names_and_fans_out_each() -> None:
    namespace = {"cities": ["Paris", "Rome"], "style": "briefly", "tone": "dry"}
    call = parse_generate(
        "--each cities --max-tokens 8 --temperature 0 --stop . --system 'Be {tone}.' "
        "--out caps -b --quiet",
        "Describe {item} {style}.\n---\nThe capital {item} has {missing}\n",
        namespace,
    )
    assert isinstance(call, GenerateCall) and call.prog == "%%generate"
    assert call.prompts == (
        "Describe Paris briefly.",
        "The capital Paris has {missing}",
        "Describe Rome briefly.",
        "The capital Rome has {missing}",
    )
    assert dict(call.params) == {
        "priority": 0,
        "max_tokens": 8,
        "temperature": 0.0,
        "stop": (".",),
        "system": "Be dry.",
        "chat": True,
    }
    defaults = SamplingParams()
    assert call.sampling == SamplingParams(max_tokens=8, temperature=0.0, stop=(".",))
    assert call.sampling.top_p == defaults.top_p, "what was not given keeps the engine's default"
    assert (call.chat, call.system, call.priority) == (True, "Be dry.", 0)
    assert (call.out, call.background, call.quiet, call.markdown, call.watch) == (
        "caps",
        True,
        True,
        False,
        False,
    )
    assert (call.each, call.lines, call.no_format) == ("cities", False, False)
    with pytest.raises(FrozenInstanceError):
        call.out = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        call.params["seed"] = 1  # type: ignore[index]


def test_parse_generate_line_form_no_format_and_option_expansion() -> None:
    namespace = {"x": 1, "items": ("a", "b")}
    expanded: list[str] = []

    def expand(line: str) -> str:
        expanded.append(line)
        return line.replace("$n", "5")

    line = parse_generate("--max-tokens 3 What's {x}?", None, namespace, expand_options=expand)
    assert isinstance(line, GenerateCall) and line.prog == "%generate"
    assert line.prompts == ("What's 1?",) and expanded == [], (
        "the line form's prompt stays verbatim"
    )
    kept = parse_generate(
        "--lines --no-format --each items --max-tokens $n",
        "{item} {x}\n\n{x}",
        namespace,
        expand_options=expand,
    )
    assert isinstance(kept, GenerateCall) and kept.sampling.max_tokens == 5
    assert kept.prompts == ("a {x}", "{x}", "b {x}", "{x}")
    assert isinstance(parse_generate("--help", "", {}), GenerateHelpCall)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("--top-p 2", r"%%generate: top_p=2.0: must be in \(0, 1\]"),
        ("--temperature -1", r"%%generate: temperature=-1.0: must be >= 0"),
        ("--min-p 1.5", r"%%generate: min_p=1.5"),
        ("--repeat-penalty 0", r"%%generate: repeat_penalty=0.0"),
        ("--top-k -1", r"%%generate: top_k=-1"),
        ("--max-tokens 0", r"%%generate: argument --max-tokens: 0 must be >= 1"),
    ],
)
def test_parse_generate_checks_sampling_values(line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_generate(line, "hi", {})


def test_parse_nbollama_calls() -> None:
    load = parse_nbollama("load ~/m.gguf --parallel 2 --ctx 64 --batch 32")
    assert load == LoadCall(model="~/m.gguf", parallel=2, ctx=64, n_batch=32)
    assert load.options() == {"parallel": 2, "ctx": 64, "n_batch": 32}
    assert parse_nbollama("load").options() == {"parallel": "auto"}  # type: ignore[union-attr]
    assert parse_nbollama("bench --parallel 4,1 --apply") == BenchCall(
        parallel=(4, 1), prompts=16, max_tokens=64, ctx=None, apply=True
    )
    assert parse_nbollama("status") == StatusCall() and parse_nbollama("unload") == UnloadCall()
    help_call = parse_nbollama("")
    assert isinstance(help_call, HelpCall) and help_call == parse_nbollama("help")
    assert [usage.split()[1] for usage, _ in help_call.commands][:2] == ["load", "status"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("load --ctx 8", r"%nbollama load: ctx=8: the context of one slot must be .* >= 32"),
        ("load --gpu-layers -4", r"%nbollama load: gpu_layers=-4"),
        ("bench --ctx 8", r"%nbollama bench: ctx=8"),
    ],
)
def test_parse_nbollama_checks_load_values(line: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_nbollama(line)


# -- usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "body", "message"),
    [
        ("--max-tokens x", "hi", r"argument --max-tokens: 'x' is not a whole number"),
        ("--max-tokens 0", "hi", r"--max-tokens: 0 must be >= 1"),
        ("--frobnicate", "hi", r"unrecognized arguments: --frobnicate"),
        ("extra words", "hi", r"unrecognized arguments: extra words"),
        ('--stop "unclosed', "hi", r"No closing quotation"),
        ("--out 1abc", "hi", r"'1abc' is not a Python variable name"),
        ("", "\n  \n---\n", r"nothing to generate"),
        ("--each nowhere", "{item}", r"--each nowhere: there is no variable 'nowhere'"),
        ("--each word", "{item}", r"--each word: wants a list of items, but word is of type str"),
        (
            "--each number",
            "{item}",
            r"--each number: wants a list of items, but number is of type int",
        ),
        ("--each empty", "{item}", r"--each empty: empty is empty"),
        ("--system hi --raw", "hi", r"--system needs --chat"),
        ("--chat --raw", "hi", r"argument --raw: not allowed with argument --chat"),
    ],
)
def test_generate_usage_errors(shell: InteractiveShell, line: str, body: str, message: str) -> None:
    shell.user_ns.update(word="abc", number=3, empty=[])
    with pytest.raises(UsageError, match=message):
        shell.run_cell_magic("generate", line, body)


def test_sampling_errors_are_usage_errors_and_queue_nothing(
    shell: InteractiveShell, kernel_engine: Engine
) -> None:
    before = kernel_engine.snapshot()["totals"]["submitted"]
    with pytest.raises(UsageError, match=r"%%generate: temperature=-1.0: must be >= 0"):
        shell.run_cell_magic("generate", "--temperature -1", "a\n---\nb")
    with pytest.raises(UsageError, match=r"%generate: top_p=2.0"):
        shell.run_line_magic("generate", "--top-p 2 hello")
    assert kernel_engine.snapshot()["totals"]["submitted"] == before


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("--top-p 2", "top_p"),
        ("--temperature -1", "temperature"),
        ("--min-p 1.5", "min_p"),
        ("--repeat-penalty 0", "repeat_penalty"),
        ("--max-tokens 0", "--max-tokens"),
    ],
)
def test_bad_sampling_values_with_no_engine_load_nothing(
    shell: InteractiveShell, no_engine: None, line: str, name: str
) -> None:
    assert session.current_engine() is None
    with pytest.raises(UsageError, match=re.escape(name)):
        shell.run_cell_magic("generate", line, "a\n---\nb")
    with pytest.raises(UsageError, match=re.escape(name)):
        shell.run_line_magic("generate", f"{line} hello")
    assert session.current_engine() is None, "a bad value must not load the bundled model"


def test_bad_load_values_keep_the_engine_and_load_nothing(
    shell: InteractiveShell, no_engine: None, kernel_engine: Engine
) -> None:
    with pytest.raises(UsageError, match=r"%nbollama load: ctx=8: .* >= 32"):
        shell.run_line_magic("nbollama", "load --ctx 8")
    assert session.current_engine() is kernel_engine and not kernel_engine.closed
    session.set_engine(None, close_previous=False)
    with pytest.raises(UsageError, match=r"ctx=8"):
        shell.run_line_magic("nbollama", "load --ctx 8")
    assert session.current_engine() is None


def test_usage_error_shows_one_line_without_traceback(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    result = shell.run_cell("%%generate --max-tokens nope\nhello\n")
    assert isinstance(result.error_in_exec, UsageError)
    err = capsys.readouterr().err
    assert (
        err.strip() == "UsageError: %%generate: argument --max-tokens: 'nope' is not a whole number"
    )


def test_nbollama_usage_errors(shell: InteractiveShell) -> None:
    with pytest.raises(UsageError, match=r"%nbollama: argument COMMAND: invalid choice: 'bogus'"):
        shell.run_line_magic("nbollama", "bogus")
    with pytest.raises(
        UsageError,
        match=r"%nbollama load: argument --parallel: 0 must be 'auto', 'adaptive' or >= 1",
    ):
        shell.run_line_magic("nbollama", "load --parallel 0")
    with pytest.raises(
        UsageError, match=r"%nbollama load: argument --ctx: 'big' is not a whole number"
    ):
        shell.run_line_magic("nbollama", "load --ctx big")
    with pytest.raises(UsageError, match=r"unrecognized arguments: --bench"):
        shell.run_line_magic("nbollama", "status --bench")


def test_help_lists_what_exists(
    shell: InteractiveShell, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_line_magic("nbollama", "help")
    text = capsys.readouterr().out
    for command in ("load", "status", "bench", "unload", "help"):
        assert f"%nbollama {command}" in text
    assert ("%nbollama dashboard" in text) == _widgets_available()
    shell.run_line_magic("generate", "--help")
    text = capsys.readouterr().out
    assert text.startswith("Generate with the kernel's engine")
    assert "--max-tokens N" in text and "--each VAR" in text
    assert ("--watch" in text) == _widgets_available()


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
    assert out == engine.summary + "\n" and "parallel=2 as asked" in out and "kv=" in out
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
        ("load --parallel 4 --min-tps 15", "only apply with parallel='adaptive'"),
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


# -- big cells and datasets --------------------------------------------------------------------


def _payload(output: dict[str, Any]) -> int:
    return sum(len(v) for v in output["data"].values())


def test_a_big_cell_shows_one_compact_view(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    prompts = [f"Line {i}: the sea is" for i in range(80)]
    results = shell.run_cell_magic(
        "generate", "--lines --max-tokens 2 --temperature 0 --out many", "\n".join(prompts)
    )
    assert [r.prompt for r in results] == prompts and results.ok
    assert shell.user_ns["many"] is results
    first, *updates = shown
    assert 'class="nbollama-progress"' in first["data"]["text/html"]
    assert all("nbollama-card" not in o["data"]["text/html"] for o in shown)
    assert all(_payload(o) < 50_000 for o in shown)
    assert len(updates) >= 2
    middle = [u for u in updates if "latest" in u["data"]["text/html"]]
    assert middle, "while it runs the view lists the latest results"
    final = updates[-1]["data"]
    assert "<b>80/80</b> done" in final["text/html"] and "80 length" in final["text/html"]
    assert "nbollama-slots" not in final["text/html"]  # nothing runs any more
    assert "<code>many</code>" in final["text/html"]
    table = results._repr_html_()  # the cell's value: a summary, not 150 rows
    assert table.count("<tr>") < 20 and "70 more rows" in table


def test_cards_forces_a_card_per_prompt_and_headers_show_what_differs(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    shell.user_ns["animals"] = [f"animal number {i}" for i in range(20)]
    results = shell.run_cell_magic(
        "generate",
        "--each animals --cards --max-tokens 1",
        "Write one long and careful sentence about the {item}",
    )
    assert len(results) == 20
    final = shown[-1]["data"]["text/html"]
    assert len(cards(final)) == 20
    head = re.search(r'<span title="([^"]*)"[^>]*>([^<]*)</span>', cards(final)[7])
    assert head is not None
    assert head.group(1) == "Write one long and careful sentence about the animal number 7"
    assert head.group(2) == "…7", "the shared template is elided in the header"


def test_each_over_a_dataframe_fills_columns_and_joins_back(
    shell: InteractiveShell, kernel_engine: Engine
) -> None:
    pandas = pytest.importorskip("pandas")
    df = pandas.DataFrame(
        {"review": ["Great film!", "Dull and long.", "Loved it."], "stars": [5, 1, 4]},
        index=["a", "b", "c"],
    )
    shell.user_ns["df"] = df
    results = shell.run_cell_magic(
        "generate",
        "--each df --max-tokens 2 --temperature 0 --quiet",
        "Classify ({stars} stars, row {index}): {review}",
    )
    assert [r.prompt for r in results] == [
        "Classify (5 stars, row a): Great film!",
        "Classify (1 stars, row b): Dull and long.",
        "Classify (4 stars, row c): Loved it.",
    ]
    assert results.index == ("a", "b", "c")
    assert list(results.to_pandas().index) == ["a", "b", "c"]
    joined = results.to_pandas(join=df)
    assert list(joined["review"]) == list(df["review"]) and list(joined["text"]) == results.texts
    shell.user_ns["reviews"] = df["review"]
    series = shell.run_cell_magic(
        "generate", "--each reviews --max-tokens 1 --quiet", "Review: {item}"
    )
    assert series.index == ("a", "b", "c")
    assert series[1].prompt == "Review: Dull and long."


def test_a_missing_column_is_an_error_before_any_load(
    shell: InteractiveShell, no_engine: None
) -> None:
    pandas = pytest.importorskip("pandas")
    shell.user_ns["df"] = pandas.DataFrame({"review": ["ok"], "stars": [3]})
    with pytest.raises(
        UsageError, match=r"\{revew\}, which is not a column of df \(did you mean \{review\}\?\)"
    ):
        shell.run_cell_magic("generate", "--each df --max-tokens 2", "Classify: {revew}")
    shell.user_ns["df"] = 42
    with pytest.raises(
        UsageError, match=r"of type int \(a list, tuple, pandas Series or DataFrame\)"
    ):
        shell.run_cell_magic("generate", "--each df", "x")
    shell.user_ns["df"] = pandas.DataFrame({"review": []})
    with pytest.raises(UsageError, match="has no rows"):
        shell.run_cell_magic("generate", "--each df", "Classify: {review}")
    assert session.current_engine() is None


def test_ctrl_c_in_a_big_cell_keeps_what_finished(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    def interrupt_after_some() -> None:
        deadline = time.monotonic() + 60
        start = kernel_engine.snapshot()["totals"]["completed"]
        while kernel_engine.snapshot()["totals"]["completed"] < start + 10:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        _thread.interrupt_main()

    prompts = [f"Story {i}:" for i in range(400)]
    shell.user_ns.pop("cut", None)
    interrupter = threading.Thread(target=interrupt_after_some)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        shell.run_cell_magic("generate", "--lines --max-tokens 3 --out cut", "\n".join(prompts))
    interrupter.join()
    cut = shell.user_ns["cut"]
    assert isinstance(cut, Results) and [r.prompt for r in cut] == prompts
    assert sum(r.ok for r in cut) >= 10 and cut.finish_reasons()["cancelled"] > 300
    final = shown[-1]["data"]["text/html"]
    assert "stopped" in final and "cancelled" in final


def test_results_and_status_tables_do_not_wrap_their_figures(
    shell: InteractiveShell, kernel_engine: Engine
) -> None:
    results = shell.run_line_magic("generate", "--max-tokens 2 --quiet Hi")
    assert re.search(r'<td style="white-space:nowrap">\d+ ms</td>', results._repr_html_())
    page = shell.run_line_magic("nbollama", "status")._repr_html_()
    assert '<div style="font-weight:bold;white-space:nowrap">nbollama engine</div>' in page
    assert '<th style="text-align:left;padding-right:1em;white-space:nowrap' in page


def test_a_big_background_cell_feeds_from_its_thread_and_ends_with_the_summary(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    prompts = [f"Background {i}:" for i in range(40)]
    job = shell.run_cell_magic("generate", "-b --lines --max-tokens 1 --out bg", "\n".join(prompts))
    assert isinstance(job, BackgroundGeneration) and "40 prompts running" in repr(job)
    results = job.wait(timeout=120)
    assert [r.prompt for r in results] == prompts and shell.user_ns["bg"] is results
    final = shown[-1]["data"]["text/html"]
    assert "<b>40/40</b> done" in final and "nbollama-results-stats" in final  # the summary
    assert "30 more rows" in final and _payload(shown[-1]) < 50_000
