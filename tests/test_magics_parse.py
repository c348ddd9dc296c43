"""``%nbollama`` and ``%%generate`` parsed and checked: prompts, options, one-line usage errors before any load.

Displays are captured with IPython's own ``CapturingDisplayPublisher``: each
``display``/``update_display`` call is one recorded output, as a kernel would
send one ``display_data``/``update_display_data`` message.
"""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nbollama import Engine, session
from nbollama.engine import SamplingParams
from nbollama.magics import interpolate, split_prompts
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
        ("--top-p 2", r"%%generate: --top-p 2.0: must be in \(0, 1\]"),  # the option typed, not the keyword
        ("--temperature -1", r"%%generate: --temperature -1.0: must be >= 0"),
        ("--min-p 1.5", r"%%generate: --min-p 1.5"),
        ("--repeat-penalty 0", r"%%generate: --repeat-penalty 0.0"),
        ("--top-k -1", r"%%generate: --top-k -1"),
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
    assert parse_nbollama("load --cache-ram 0").options() == {"parallel": "auto", "cache_ram": 0}  # type: ignore[union-attr]
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
        ("load --ctx 8", r"%nbollama load: --ctx 8: the context of one slot must be .* >= 32"),
        ("load --gpu-layers -4", r"%nbollama load: --gpu-layers -4"),
        ("bench --ctx 8", r"%nbollama bench: --ctx 8"),
        ("load --cache-ram -1", r"%nbollama load: argument --cache-ram: .*-1"),
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
    with pytest.raises(UsageError, match=r"%%generate: --temperature -1.0: must be >= 0"):
        shell.run_cell_magic("generate", "--temperature -1", "a\n---\nb")
    with pytest.raises(UsageError, match=r"%generate: --top-p 2.0"):
        shell.run_line_magic("generate", "--top-p 2 hello")
    assert kernel_engine.snapshot()["totals"]["submitted"] == before


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("--top-p 2", "--top-p 2.0: must be in (0, 1]"),
        ("--temperature -1", "--temperature -1.0: must be >= 0"),
        ("--min-p 1.5", "--min-p 1.5"),
        ("--repeat-penalty 0", "--repeat-penalty 0"),
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
    with pytest.raises(UsageError, match=r"%nbollama load: --ctx 8: .* >= 32"):
        shell.run_line_magic("nbollama", "load --ctx 8")
    assert session.current_engine() is kernel_engine and not kernel_engine.closed
    session.set_engine(None, close_previous=False)
    with pytest.raises(UsageError, match=r"--ctx 8"):
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


