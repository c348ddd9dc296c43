"""The ``%%generate``/``%generate`` grammar: what was typed, as one checked, frozen ``GenerateCall``.

Options, prompts (split, ``{name}``-filled, fanned out by ``--each``) and every
sampling value are decided here, checked with the engine's own rules, before
any engine is touched: a typo is a one-line ``UsageError``, never a model load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from IPython.core.error import UsageError

from .._api.outputs import OutputRequest
from ..engine import SamplingParams, check_request_params
from ..exceptions import InvalidParamsError
from ._args import (
    Parser,
    engine_name,
    engine_names,
    first_token,
    in_option_words,
    positive_int,
    shell_split,
    usage_line,
    variable,
    widgets_available,
)
from ._fanout import fan_out
from ._prompts import interpolate, split_prompts

__all__ = ["GenerateCall", "GenerateHelpCall", "parse_generate"]

_OPTION_LIKE = re.compile(r"-[A-Za-z-]")
#: keywords whose options a user types as --with-dashes (the engine's messages name the keywords)
_OPTION_WORDS = (
    "max_tokens", "top_k", "top_p", "min_p", "repeat_penalty", "choice_score", "json_schema",
    "prompt_logprobs", "logprobs", "choices", "regex", "grammar", "temperature", "seed", "stop", "system",
)  # fmt: skip
_SAMPLING_OPTIONS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "seed",
)


@dataclass(frozen=True)
class GenerateHelpCall:
    """``%generate --help``: the usage line, and whether ``--watch`` exists here."""

    usage: str
    watch_available: bool


@dataclass(frozen=True)
class GenerateCall:
    """One ``%%generate``/``%generate`` call, ready to queue: every value already checked."""

    prog: str
    #: The final prompts, in order: ``{name}`` filled and ``--each`` fanned out.
    prompts: tuple[str, ...]
    #: The keywords for ``engine.submit_many``, exactly as the user gave them.
    params: Mapping[str, Any] = field(hash=False)
    #: The same values, checked by the engine's rules (defaults filled in).
    sampling: SamplingParams
    out: str | None = None
    background: bool = False
    markdown: bool = False
    quiet: bool = False
    watch: bool = False
    lines: bool = False
    each: str | None = None
    no_format: bool = False
    chat: bool = False
    system: str | None = None
    priority: int = 0
    #: ``--cards``: one card per prompt whatever their number (else above ``CARDS_MAX``, one compact view).
    cards: bool = False
    #: With ``--each`` over a pandas Series or DataFrame: each prompt's row label, for ``Results.to_pandas()``.
    index: tuple[Any, ...] | None = field(default=None, hash=False)
    #: ``--choices`` or a format (``--json-schema``, ``--regex``, ``--grammar``), checked; None: neither.
    output: OutputRequest = field(default=None, hash=False)
    #: ``--model NAME``: the engine of that name (None: the default); ``--models a,b``: each of them.
    model: str | None = None
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # a read-only view: the call is a value, its params must not change after checking
        if not isinstance(self.params, MappingProxyType):
            object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass
class _GenerateParser:
    parser: Parser
    valued: frozenset[str]  # options followed by a value (the line form needs to know)


def _generate_parser(*, line: bool) -> _GenerateParser:
    prog = "%generate" if line else "%%generate"
    parser = Parser(prog=prog, add_help=False, allow_abbrev=False)
    valued: set[str] = set()

    def add(*names: str, to: Any = parser, **kwargs: Any) -> None:
        to.add_argument(*names, **kwargs)
        if kwargs.get("action") not in ("store_true", "store_const"):
            valued.update(names)

    add("-h", "--help", action="store_true")
    add("--max-tokens", type=positive_int, metavar="N")
    add("--temperature", type=float, metavar="T")
    add("--top-k", type=int, metavar="K")
    add("--top-p", type=float, metavar="P")
    add("--min-p", type=float, metavar="P")
    add("--repeat-penalty", type=float, metavar="R")
    add("--seed", type=int, metavar="N")
    add("--stop", action="append", metavar="TEXT")
    add("--system", metavar="TEXT")
    template = parser.add_mutually_exclusive_group()
    add("--chat", to=template, dest="chat", action="store_const", const=True, default=None)
    add("--raw", to=template, dest="chat", action="store_const", const=False)
    add("--priority", type=int, default=0, metavar="N")
    add("--out", type=variable, metavar="VAR")
    add("--each", type=variable, metavar="VAR")
    add("--lines", action="store_true")
    add("--no-format", action="store_true")
    add("-b", "--background", action="store_true")
    add("--markdown", action="store_true")
    add("--quiet", action="store_true")
    add("--cards", action="store_true")
    store = parser.add_mutually_exclusive_group()  # the result store's policy; default "auto"
    add("--cache", to=store, dest="cache", action="store_const", const=True, default=None)
    add("--no-cache", to=store, dest="cache", action="store_const", const=False)
    add("--logprobs", type=int, metavar="K")
    add("--prompt-logprobs", action="store_true")
    add("--choices", metavar="A,B|VAR")
    add("--choice-score", choices=("sum", "mean"))
    add("--json-schema", type=variable, metavar="VAR")
    add("--regex", metavar="PATTERN")
    add("--grammar", type=variable, metavar="VAR")
    target = parser.add_mutually_exclusive_group()
    add("--model", to=target, type=engine_name, metavar="NAME")
    add("--models", to=target, type=engine_names, metavar="A,B")
    if widgets_available():
        add("--watch", action="store_true")
    return _GenerateParser(parser, frozenset(valued))


def _split_line_form(line: str, spec: _GenerateParser) -> tuple[list[str], str]:
    """``%generate [options] PROMPT``: the options up front, the rest of the line verbatim.

    The prompt is not shell-split, so apostrophes and quotes in it are fine;
    ``--`` ends the options when a prompt starts with a dash.
    """
    prog = spec.parser.prog
    args: list[str] = []
    rest = line
    needs_value = False
    while True:
        rest = rest.lstrip()
        if not rest:
            return args, ""
        if not needs_value and not _OPTION_LIKE.match(rest):
            return args, rest
        token, after = first_token(rest, prog)
        if needs_value:
            args.append(token)
            needs_value = False
        elif token == "--":
            return args, after.strip()
        else:
            args.append(token)
            name, has_value = token.split("=", 1)[0], "=" in token
            needs_value = name in spec.valued and not has_value
        rest = after


def _choices(prog: str, text: str, namespace: Mapping[str, Any]) -> object:
    """``--choices A,B,C`` (each option stripped: the engine adds the space a continuation
    needs), or ``--choices VAR`` naming a list in the notebook."""
    if text.isidentifier() and "," not in text:
        if text not in namespace:
            raise UsageError(
                f"{prog}: --choices {text}: give the options as A,B or name a list in the "
                f"notebook (there is no variable {text!r})"
            )
        value = namespace[text]
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            return value  # the engine's check says what it wants
        return tuple(value)
    return tuple(part.strip() for part in text.split(","))


def _from_namespace(prog: str, option: str, name: str, namespace: Mapping[str, Any]) -> object:
    if name not in namespace:
        raise UsageError(f"{prog}: {option} {name}: there is no variable {name!r} in the notebook")
    return namespace[name]


def _raw_regex(raw_tokens: list[str], expanded: str) -> str:
    """``--regex``'s pattern as typed: ``{3}`` is a quantifier there, not a ``{name}`` to expand."""
    for i, token in enumerate(raw_tokens):
        if token == "--regex" and i + 1 < len(raw_tokens):
            return raw_tokens[i + 1]
        if token.startswith("--regex="):
            return token.removeprefix("--regex=")
    return expanded


def _output_params(prog: str, args: Any, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The keywords of ``--logprobs`` and the rest, as ``engine.submit`` takes them."""
    params: dict[str, Any] = {}
    if args.logprobs is not None:
        params["logprobs"] = args.logprobs
    if args.prompt_logprobs:
        params["prompt_logprobs"] = True
    if args.choices is not None:
        params["choices"] = _choices(prog, args.choices, namespace)
    if args.choice_score is not None:
        params["choice_score"] = args.choice_score
    if args.json_schema is not None:
        params["json_schema"] = _from_namespace(prog, "--json-schema", args.json_schema, namespace)
    if args.regex is not None:
        params["regex"] = args.regex
    if args.grammar is not None:
        params["grammar"] = _from_namespace(prog, "--grammar", args.grammar, namespace)
    return params


def _no_expansion(line: str) -> str:
    return line


def parse_generate(
    line: str,
    cell: str | None,
    namespace: Mapping[str, Any],
    *,
    expand_options: Callable[[str], str] = _no_expansion,
) -> GenerateCall | GenerateHelpCall:
    """The ``%%generate`` cell (or ``%generate`` line) as a checked call.

    ``namespace`` is the notebook's variables (``{name}`` and ``--each``);
    ``expand_options`` is IPython's ``$name`` expansion, applied to the cell
    form's options line only (the line form's prompt stays verbatim). Every
    sampling value is checked with the engine's own rules, so a bad one is a
    UsageError before any engine is loaded; so are ``--choices`` and the
    formats (a bad schema, regex or grammar), with the engine's own check.
    """
    spec = _generate_parser(line=cell is None)
    prog = spec.parser.prog
    if cell is None:
        tokens, body = _split_line_form(line, spec)
    else:
        tokens, body = shell_split(expand_options(line), prog), cell
    args = spec.parser.parse_args(tokens)
    if cell is not None and args.regex is not None:
        args.regex = _raw_regex(shell_split(line, prog), args.regex)
    if args.help:
        return GenerateHelpCall(
            usage=usage_line(spec.parser),
            watch_available="--watch" in spec.parser.format_usage(),
        )
    if args.models:
        clash = [o for o, on in (("--background", args.background), ("--watch", getattr(args, "watch", False))) if on]
        if clash:
            raise UsageError(f"{prog}: --models runs in the cell and shows one table: not with {', '.join(clash)}")
    if args.system is not None and args.chat is False:
        raise UsageError(
            f"{prog}: --system needs --chat (the system message goes through the chat template)"
        )

    fill_from: Mapping[str, Any] = {} if args.no_format else namespace
    templates = [body.strip()] if cell is None else split_prompts(body, lines=args.lines)
    templates = [t for t in templates if t]
    if not templates:
        where = "a prompt after the options" if cell is None else "a prompt in the cell"
        raise UsageError(f"{prog}: nothing to generate: write {where}")
    index: tuple[Any, ...] | None = None
    if args.each is not None:
        prompts, index = fan_out(prog, args.each, templates, namespace, no_format=args.no_format)
    else:
        prompts = [interpolate(t, fill_from) for t in templates]

    params: dict[str, Any] = {"priority": args.priority}
    for name in _SAMPLING_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.stop:
        params["stop"] = tuple(args.stop)
    if args.system is not None:
        params["system"] = interpolate(args.system, fill_from)
        params["chat"] = True
    elif args.chat is not None:
        params["chat"] = args.chat
    params.update(_output_params(prog, args, namespace))
    if args.cache is not None:
        params["cache"] = args.cache
    try:
        sampling, request = check_request_params(dict(params))
    except InvalidParamsError as exc:  # the engine's rule, in the options' words
        raise UsageError(f"{prog}: {in_option_words(str(exc), _OPTION_WORDS)}") from None

    return GenerateCall(
        prog=prog,
        prompts=tuple(prompts),
        params=params,
        sampling=sampling,
        out=args.out,
        background=args.background,
        markdown=args.markdown,
        quiet=args.quiet,
        watch=getattr(args, "watch", False),
        lines=args.lines,
        each=args.each,
        no_format=args.no_format,
        chat=bool(request["chat"]),
        system=request["system"],
        priority=request["priority"],
        cards=args.cards,
        index=index,
        output=request["output"],
        model=args.model,
        models=args.models or (),
    )
