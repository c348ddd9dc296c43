"""Reading what the user typed: one checked, frozen call object per magic invocation.

Everything a magic needs is decided here, before any engine is touched: the
options, the prompts (split, ``{name}``-filled, fanned out by ``--each``) and
every sampling and load value, checked with the engine's own rules. So a typo
is a one-line ``UsageError`` and never costs a model load.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import keyword
import re
import shlex
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NoReturn, TypeAlias

from IPython.core.error import UsageError

from ..engine import LoadOptions, SamplingParams, check_request_params
from ..exceptions import InvalidParamsError

__all__ = [
    "COMMANDS",
    "LoadCall",
    "StatusCall",
    "DashboardCall",
    "BenchCall",
    "UnloadCall",
    "ConnectCall",
    "DisconnectCall",
    "HelpCall",
    "NbollamaCall",
    "GenerateCall",
    "GenerateHelpCall",
    "parse_nbollama",
    "parse_generate",
    "split_prompts",
    "interpolate",
]

# `{name}` with a plain identifier, not part of a doubled `{{name}}` (templates keep theirs).
_FIELD = re.compile(r"(?<!\{)\{([^\W\d]\w*)\}(?!\})")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
_OPTION_LIKE = re.compile(r"-[A-Za-z-]")
_SAMPLING_OPTIONS = (
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repeat_penalty",
    "seed",
)

#: ``%nbollama`` subcommands and their one-line help.
COMMANDS: dict[str, str] = {
    "load": "load a model as the kernel's engine (replaces the current one)",
    "status": "slots, queue, throughput and memory, as a table",
    "dashboard": "a live dashboard of the kernel's engine",
    "bench": "measure throughput and latency at several parallel values; recommend one",
    "unload": "close the engine and free its memory",
    "connect": "use a llama-server, Ollama, vLLM or OpenAI-compatible server as the kernel's engine",
    "disconnect": "close the connection to the server (it keeps running); like unload",
    "help": "this help",
}


# -- prompts -----------------------------------------------------------------------------


def split_prompts(body: str, *, lines: bool = False) -> list[str]:
    """The prompts of a ``%%generate`` cell: blocks between lines holding only ``---``
    (or, with ``lines=True``, every non-empty line). Empty blocks are dropped."""
    if lines:
        return [s for s in (line.strip() for line in body.splitlines()) if s and s != "---"]
    blocks: list[list[str]] = [[]]
    for line in body.splitlines():
        if line.strip() == "---":
            blocks.append([])
        else:
            blocks[-1].append(line)
    prompts = (_LEADING_BLANK_LINES.sub("", "\n".join(block)).rstrip() for block in blocks)
    return [p for p in prompts if p]


def interpolate(
    template: str, namespace: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> str:
    """Fill ``{name}`` from ``extra`` then ``namespace``; leave everything else byte-identical.

    Only a plain identifier in single braces is a field, and only when the name
    exists: unknown names, ``{{doubled}}`` braces, JSON and code survive as written.
    """

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if extra is not None and name in extra:
            return str(extra[name])
        if name in namespace:
            return str(namespace[name])
        return match.group(0)

    return _FIELD.sub(fill, template)


# -- argparse, answering with UsageError -----------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that answers with a short UsageError instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message.strip() if message else f"{self.prog}: stopped")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _int_or_auto(text: str) -> int | Literal["auto"]:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or a whole number") from None


def _parallel(text: str) -> int | Literal["auto", "adaptive"]:
    if text == "adaptive":
        return "adaptive"
    try:
        value = _int_or_auto(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 'auto', 'adaptive' or a whole number"
        ) from None
    if value != "auto" and value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 'auto', 'adaptive' or >= 1")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be > 0")
    return value


def _parallel_list(text: str) -> list[int]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give parallel values as N,N,... (e.g. 1,2,4,8)")
    return [_positive_int(v) for v in values]


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be > 0 seconds")
    return value


def _variable(text: str) -> str:
    if not text.isidentifier() or keyword.iskeyword(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python variable name")
    return text


def _shell_split(line: str, prog: str) -> list[str]:
    try:
        return shlex.split(line, comments=False, posix=True)
    except ValueError as exc:  # "No closing quotation"
        raise UsageError(f"{prog}: {exc}") from None


def _first_token(text: str, prog: str) -> tuple[str, str]:
    """One shell-quoted token from the start of ``text`` and what follows it."""
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        token = lexer.get_token()
    except ValueError as exc:
        raise UsageError(f"{prog}: {exc}") from None
    consumed = lexer.instream.tell()
    return token or "", text[consumed:]


def _widgets_available() -> bool:
    """``nbollama.widgets`` is optional here: without it, ``dashboard`` and ``--watch`` do not exist."""
    try:
        return importlib.util.find_spec("nbollama.widgets") is not None
    except (ImportError, ValueError):
        return False


@dataclass
class _GenerateParser:
    parser: _Parser
    valued: frozenset[str]  # options followed by a value (the line form needs to know)


def _generate_parser(*, line: bool) -> _GenerateParser:
    prog = "%generate" if line else "%%generate"
    parser = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    valued: set[str] = set()

    def add(*names: str, to: Any = parser, **kwargs: Any) -> None:
        to.add_argument(*names, **kwargs)
        if kwargs.get("action") not in ("store_true", "store_const"):
            valued.update(names)

    add("-h", "--help", action="store_true")
    add("--max-tokens", type=_positive_int, metavar="N")
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
    add("--out", type=_variable, metavar="VAR")
    add("--each", type=_variable, metavar="VAR")
    add("--lines", action="store_true")
    add("--no-format", action="store_true")
    add("-b", "--background", action="store_true")
    add("--markdown", action="store_true")
    add("--quiet", action="store_true")
    add("--cards", action="store_true")
    if _widgets_available():
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
        token, after = _first_token(rest, prog)
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


def _nbollama_parser(*, dashboard: bool) -> tuple[_Parser, dict[str, _Parser]]:
    """The parser and its subcommands; ``dashboard`` exists only when the widgets do."""
    parser = _Parser(prog="%nbollama", add_help=False, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs = {
        name: commands.add_parser(name, help=text, add_help=False, allow_abbrev=False)
        for name, text in COMMANDS.items()
        if dashboard or name != "dashboard"
    }
    load = subs["load"]
    load.add_argument("model", nargs="?", default=None, metavar="MODEL")
    load.add_argument("--parallel", type=_parallel, default="auto", metavar="N|auto|adaptive")
    load.add_argument("--max-parallel", type=_positive_int, metavar="N")
    load.add_argument("--min-tps", type=_positive_number, metavar="R")
    load.add_argument("--max-ttft", type=_positive_number, metavar="S")
    load.add_argument("--ctx", type=_positive_int, metavar="N")
    load.add_argument("--gpu-layers", type=_int_or_auto, metavar="N|auto")
    load.add_argument("--threads", type=_positive_int, metavar="N")
    load.add_argument("--batch", type=_positive_int, metavar="N")
    load.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None)
    load.add_argument("--reproducible", action="store_true", default=None)
    connect = subs["connect"]
    connect.add_argument("url", metavar="URL")
    connect.add_argument("--kind", choices=_remote_kinds(), default="auto")
    connect.add_argument("--model", metavar="NAME")
    connect.add_argument("--api-key-env", metavar="VAR")
    connect.add_argument("--max-inflight", type=_positive_int, metavar="N")
    connect.add_argument("--timeout", type=_positive_seconds, metavar="SECONDS")
    connect.add_argument("--ca-bundle", metavar="PATH")
    bench = subs["bench"]
    # a remote engine sweeps client concurrency (default 1,2,4,8,16,32); the local one parallel (1,2,4,8)
    bench.add_argument(
        "--parallel",
        "--concurrency",
        dest="parallel",
        type=_parallel_list,
        default=None,
        metavar="N,N,...",
    )
    bench.add_argument("--prompts", type=_positive_int, default=16, metavar="N")
    bench.add_argument("--max-tokens", type=_positive_int, default=64, metavar="N")
    bench.add_argument("--ctx", type=_positive_int, metavar="N")
    bench.add_argument("--apply", action="store_true")
    return parser, subs


# -- %nbollama: one call per subcommand ------------------------------------------------------


@dataclass(frozen=True)
class LoadCall:
    """``%nbollama load``: the model and the load options given (checked with ``LoadOptions``)."""

    model: str | None
    parallel: int | Literal["auto"] = "auto"
    ctx: int | None = None
    n_batch: int | None = None
    gpu_layers: int | Literal["auto"] | None = None
    threads: int | None = None
    prefix_cache: bool | None = None
    reproducible: bool | None = None
    max_parallel: int | None = None
    min_tps: float | None = None
    max_ttft: float | None = None

    def options(self) -> dict[str, Any]:
        """Keywords for ``session.load``: only those given, so the engine's defaults hold."""
        given = {
            "parallel": self.parallel,
            "ctx": self.ctx,
            "n_batch": self.n_batch,
            "gpu_layers": self.gpu_layers,
            "threads": self.threads,
            "prefix_cache": self.prefix_cache,
            "reproducible": self.reproducible,
            "max_parallel": self.max_parallel,
            "min_tps": self.min_tps,
            "max_ttft": self.max_ttft,
        }
        return {key: value for key, value in given.items() if value is not None}


@dataclass(frozen=True)
class StatusCall:
    """``%nbollama status``."""


@dataclass(frozen=True)
class DashboardCall:
    """``%nbollama dashboard`` (only when ``nbollama.widgets`` exists)."""


@dataclass(frozen=True)
class BenchCall:
    """``%nbollama bench``: the sweep's arguments (``parallel`` None: the engine kind's default values)."""

    parallel: tuple[int, ...] | None
    prompts: int
    max_tokens: int
    ctx: int | None
    apply: bool


@dataclass(frozen=True)
class UnloadCall:
    """``%nbollama unload``."""


@dataclass(frozen=True)
class ConnectCall:
    """``%nbollama connect URL``: where, and how; checked (URL, kind, the key's variable) before any network call.

    Only the NAME of the API key's environment variable is kept, never the key.
    """

    url: str
    kind: str = "auto"
    model: str | None = None
    api_key_env: str | None = None
    max_inflight: int | None = None
    timeout: float | None = None
    ca_bundle: str | None = None

    def options(self) -> dict[str, Any]:
        """Keywords for ``session.connect``: only those given."""
        given = {
            "kind": self.kind,
            "model": self.model,
            "api_key_env": self.api_key_env,
            "max_inflight": self.max_inflight,
            "timeout": self.timeout,
            "ca_bundle": self.ca_bundle,
        }
        return {key: value for key, value in given.items() if value is not None}

    def __repr__(self) -> str:
        from ..remote import redact_url

        return f"ConnectCall(url={redact_url(self.url)!r}, kind={self.kind!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"


@dataclass(frozen=True)
class DisconnectCall:
    """``%nbollama disconnect``."""


@dataclass(frozen=True)
class HelpCall:
    """``%nbollama help`` (or no command): each command's usage line and what it does."""

    commands: tuple[tuple[str, str], ...]


NbollamaCall: TypeAlias = (
    LoadCall
    | StatusCall
    | DashboardCall
    | BenchCall
    | UnloadCall
    | ConnectCall
    | DisconnectCall
    | HelpCall
)


def _remote_kinds() -> tuple[str, ...]:
    from ..remote import KINDS

    return KINDS


def _check_load_options(prog: str, **options: Any) -> None:
    try:
        LoadOptions.check(**options)
    except InvalidParamsError as exc:
        raise UsageError(f"{prog}: {exc}") from None


def parse_nbollama(line: str) -> NbollamaCall:
    """The ``%nbollama`` line as a checked call; a bad argument is a UsageError here."""
    parser, subs = _nbollama_parser(dashboard=_widgets_available())
    args = parser.parse_args(_shell_split(line, parser.prog))
    command = args.command or "help"
    if command == "load":
        call = LoadCall(
            model=args.model,
            parallel=args.parallel,
            ctx=args.ctx,
            n_batch=args.batch,
            gpu_layers=args.gpu_layers,
            threads=args.threads,
            prefix_cache=args.prefix_cache,
            reproducible=args.reproducible,
            max_parallel=args.max_parallel,
            min_tps=args.min_tps,
            max_ttft=args.max_ttft,
        )
        _check_load_options("%nbollama load", **call.options())
        return call
    if command == "status":
        return StatusCall()
    if command == "dashboard":
        return DashboardCall()
    if command == "bench":
        if args.ctx is not None:
            _check_load_options("%nbollama bench", ctx=args.ctx)
        return BenchCall(
            parallel=tuple(args.parallel) if args.parallel is not None else None,
            prompts=args.prompts,
            max_tokens=args.max_tokens,
            ctx=args.ctx,
            apply=args.apply,
        )
    if command == "unload":
        return UnloadCall()
    if command == "connect":
        call = ConnectCall(
            url=args.url,
            kind=args.kind,
            model=args.model,
            api_key_env=args.api_key_env,
            max_inflight=args.max_inflight,
            timeout=args.timeout,
            ca_bundle=args.ca_bundle,
        )
        from ..remote import check_connect

        try:
            check_connect(call.url, **call.options())  # the URL, the key's variable, the CA file
        except InvalidParamsError as exc:
            raise UsageError(f"%nbollama connect: {exc}") from None
        return call
    if command == "disconnect":
        return DisconnectCall()
    usages = tuple(
        (" ".join(sub.format_usage().split()).removeprefix("usage: "), COMMANDS[name])
        for name, sub in subs.items()
    )
    return HelpCall(usages)


# -- %%generate / %generate ------------------------------------------------------------------


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

    def __post_init__(self) -> None:
        # a read-only view: the call is a value, its params must not change after checking
        if not isinstance(self.params, MappingProxyType):
            object.__setattr__(self, "params", MappingProxyType(dict(self.params)))


@dataclass(frozen=True)
class _Each:
    """What ``--each VAR`` fans out: one mapping of template fields per item, and their labels."""

    fields: list[dict[str, Any]]
    index: list[Any] | None  # pandas row labels; None for a list
    columns: tuple[str, ...] | None  # a DataFrame's columns


def _is_pandas(value: object, kind: str) -> bool:
    """``isinstance(value, pandas.<kind>)`` without importing pandas when it is not loaded."""
    module = sys.modules.get("pandas")
    return module is not None and isinstance(value, getattr(module, kind))


def _each_items(prog: str, name: str, namespace: Mapping[str, Any]) -> _Each:
    """The items of ``--each VAR``: a non-empty list, tuple, pandas Series or DataFrame (not a string).

    A DataFrame gives one item per row, its columns as ``{column}`` fields and
    its row label as ``{index}``; a Series its values as ``{item}`` and labels as ``{index}``.
    """
    if name not in namespace:
        raise UsageError(f"{prog}: --each {name}: there is no variable {name!r} in the notebook")
    value = namespace[name]
    if _is_pandas(value, "DataFrame"):
        if value.empty:
            raise UsageError(f"{prog}: --each {name}: the DataFrame {name} has no rows")
        columns = tuple(str(c) for c in value.columns)
        labels = list(value.index)
        rows = value.to_dict("records")
        fields = [
            {"index": label, **{str(k): v for k, v in row.items()}}
            for label, row in zip(labels, rows)
        ]
        return _Each(fields, labels, columns)
    if _is_pandas(value, "Series"):
        if value.empty:
            raise UsageError(f"{prog}: --each {name}: the Series {name} is empty")
        labels = list(value.index)
        return _Each(
            [{"item": v, "index": label} for label, v in zip(labels, value.tolist())],
            labels,
            None,
        )
    wrong_type = UsageError(
        f"{prog}: --each {name}: wants a list of items, but {name} is of type "
        f"{type(value).__name__} (a list, tuple, pandas Series or DataFrame)"
    )
    if isinstance(value, (str, bytes)):
        raise wrong_type
    try:
        items = list(value)
    except TypeError:
        raise wrong_type from None
    if not items:
        raise UsageError(f"{prog}: --each {name}: {name} is empty")
    return _Each([{"item": item} for item in items], None, None)


def _check_columns(
    prog: str, name: str, each: _Each, templates: list[str], namespace: Mapping[str, Any]
) -> None:
    """With a DataFrame, a ``{field}`` that is no column (nor a notebook variable) is a typo: say so now."""
    if each.columns is None:
        return
    known = set(each.columns) | {"index"} | set(namespace)
    for template in templates:
        for match in _FIELD.finditer(template):
            field_name = match.group(1)
            if field_name in known:
                continue
            close = difflib.get_close_matches(field_name, each.columns, n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise UsageError(
                f"{prog}: --each {name}: the template uses {{{field_name}}}, which is not a column of "
                f"{name}{hint}; its columns: {', '.join(each.columns)}"
            )


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
    UsageError before any engine is loaded.
    """
    spec = _generate_parser(line=cell is None)
    prog = spec.parser.prog
    if cell is None:
        tokens, body = _split_line_form(line, spec)
    else:
        tokens, body = _shell_split(expand_options(line), prog), cell
    args = spec.parser.parse_args(tokens)
    if args.help:
        return GenerateHelpCall(
            usage=" ".join(spec.parser.format_usage().split()).removeprefix("usage: "),
            watch_available="--watch" in spec.parser.format_usage(),
        )
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
        each = _each_items(prog, args.each, namespace)
        if not args.no_format:
            _check_columns(prog, args.each, each, templates, namespace)
        prompts = [interpolate(t, fill_from, item) for item in each.fields for t in templates]
        if each.index is not None:
            index = tuple(label for label in each.index for _ in templates)
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
    try:
        sampling, request = check_request_params(dict(params))
    except InvalidParamsError as exc:
        raise UsageError(f"{prog}: {exc}") from None

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
    )
