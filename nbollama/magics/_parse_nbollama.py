"""The ``%nbollama`` grammar: a subcommand and its options, as one checked, frozen call.

``load`` values are checked with ``LoadOptions``' own rules and ``connect``'s
URL, key variable and CA file with the remote engine's, before anything loads
or connects: a typo is a one-line ``UsageError``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeAlias

from IPython.core.error import UsageError

from ..engine import LoadOptions
from ..exceptions import InvalidParamsError
from ._args import (
    Parser,
    duration,
    engine_list,
    engine_name,
    eval_limit,
    flash_attn_arg,
    folder,
    in_option_words,
    int_or_auto,
    kv_type_list,
    non_negative_int,
    parallel_arg,
    parallel_list,
    positive_int,
    positive_number,
    positive_seconds,
    shell_split,
    usage_line,
    variable,
    widgets_available,
)

__all__ = [
    "COMMANDS",
    "LoadCall",
    "StatusCall",
    "DashboardCall",
    "BenchCall",
    "UnloadCall",
    "ConnectCall",
    "DisconnectCall",
    "UseCall",
    "EvalCall",
    "ModelsCall",
    "CacheCall",
    "HelpCall",
    "NbollamaCall",
    "parse_nbollama",
]

#: ``%nbollama`` subcommands and their one-line help.
COMMANDS: dict[str, str] = {
    "load": "load a model as the kernel's engine (replaces the current one; --as NAME adds one beside it)",
    "status": "slots, queue, throughput and memory, as a table (every engine, or one: status NAME)",
    "dashboard": "a live dashboard of the kernel's engine",
    "bench": "measure throughput and latency at several parallel values; recommend one",
    "unload": "close the engine (or the one called NAME) and free its memory",
    "connect": "use a llama-server, Ollama, vLLM or OpenAI-compatible server as the kernel's engine",
    "disconnect": "close the connection to the server (it keeps running); like unload",
    "use": "make the engine called NAME the default: cells, generate() and the views follow it",
    "models": "the GGUF models on this machine: Ollama's store, the Hugging Face cache, LM Studio, folders",
    "eval": "lm-evaluation-harness tasks on the engine (or --engine a,b): live progress, then metrics ± stderr",
    "cache": "the result store: its size and hit rate; `cache clear` removes entries; --dir moves it",
    "help": "this help",
}


def _nbollama_parser(*, dashboard: bool) -> tuple[Parser, dict[str, Parser]]:
    """The parser and its subcommands; ``dashboard`` exists only when the widgets do."""
    parser = Parser(prog="%nbollama", add_help=False, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subs = {
        name: commands.add_parser(name, help=text, add_help=False, allow_abbrev=False)
        for name, text in COMMANDS.items()
        if dashboard or name != "dashboard"
    }
    load = subs["load"]
    load.add_argument("model", nargs="?", default=None, metavar="MODEL")
    load.add_argument("--parallel", type=parallel_arg, default="auto", metavar="N|auto|adaptive")
    load.add_argument("--max-parallel", type=positive_int, metavar="N")
    load.add_argument("--min-tps", type=positive_number, metavar="R")
    load.add_argument("--max-ttft", type=positive_number, metavar="S")
    load.add_argument("--ctx", type=positive_int, metavar="N")
    load.add_argument("--gpu-layers", type=int_or_auto, metavar="N|auto")
    load.add_argument("--threads", type=positive_int, metavar="N")
    load.add_argument("--batch", type=positive_int, metavar="N")
    load.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", default=None)
    load.add_argument("--reproducible", action="store_true", default=None)
    load.add_argument("--kv-type", metavar="f16|q8_0|q4_0")
    load.add_argument("--kv-type-v", metavar="TYPE")
    load.add_argument("--flash-attn", type=flash_attn_arg, metavar="on|off|auto")
    load.add_argument("--jump-forward", type=_on_off, metavar="on|off")
    load.add_argument("--cache-ram", type=non_negative_int, metavar="MIB")
    load.add_argument("--as", dest="name", type=engine_name, metavar="NAME")
    load.add_argument("--download", action="store_true", default=None)
    connect = subs["connect"]
    connect.add_argument("url", metavar="URL")
    connect.add_argument("--kind", choices=_remote_kinds(), default="auto")
    connect.add_argument("--model", metavar="NAME")
    connect.add_argument("--api-key-env", metavar="VAR")
    connect.add_argument("--max-inflight", type=positive_int, metavar="N")
    connect.add_argument("--timeout", type=positive_seconds, metavar="SECONDS")
    connect.add_argument("--ca-bundle", metavar="PATH")
    connect.add_argument("--as", dest="name", type=engine_name, metavar="NAME")
    subs["status"].add_argument("name", nargs="?", type=engine_name, metavar="NAME")
    subs["unload"].add_argument("name", nargs="?", type=engine_name, metavar="NAME")
    subs["disconnect"].add_argument("name", nargs="?", type=engine_name, metavar="NAME")
    subs["use"].add_argument("name", type=engine_name, metavar="NAME")
    subs["models"].add_argument("folders", nargs="*", metavar="FOLDER")
    evaluation = subs["eval"]
    evaluation.add_argument("tasks", nargs="+", metavar="TASKS")
    evaluation.add_argument("--limit", type=eval_limit, metavar="N")
    evaluation.add_argument("--num-fewshot", type=non_negative_int, metavar="K")
    evaluation.add_argument("--include-path", action="append", type=folder, default=[], metavar="DIR")
    evaluation.add_argument("--engine", dest="engines", type=engine_list, default=(), metavar="NAME[,NAME]")
    evaluation.add_argument("--out", type=variable, metavar="VAR")
    cache = subs["cache"]
    cache.add_argument("action", nargs="?", choices=["clear"], metavar="clear")
    cache.add_argument("--model", metavar="NAME")
    cache.add_argument("--older-than", type=duration, metavar="AGE")
    cache.add_argument("--dir", dest="directory", metavar="PATH")
    bench = subs["bench"]
    # a remote engine sweeps client concurrency (default 1,2,4,8,16,32); the local one parallel (1,2,4,8)
    bench.add_argument(
        "--parallel",
        "--concurrency",
        dest="parallel",
        type=parallel_list,
        default=None,
        metavar="N,N,...",
    )
    bench.add_argument("--prompts", type=positive_int, default=16, metavar="N")
    bench.add_argument("--max-tokens", type=positive_int, default=64, metavar="N")
    bench.add_argument("--ctx", type=positive_int, metavar="N")
    bench.add_argument("--kv-type", dest="kv_types", type=kv_type_list, metavar="f16,q8_0,...")
    bench.add_argument("--apply", action="store_true")
    return parser, subs


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
    kv_type: str | None = None
    kv_type_v: str | None = None
    flash_attn: bool | Literal["auto"] | None = None
    jump_forward: bool | None = None  # --jump-forward off: a format's forced tokens are sampled too
    cache_ram: int | None = None  # --cache-ram MIB: host RAM for prompts evicted from slots
    name: str | None = None  # --as NAME
    download: bool | None = None  # hf:... not in the cache: fetch it

    def options(self) -> dict[str, Any]:
        """The load options given (``LoadOptions``' keywords), so the engine's defaults hold."""
        return _given(self, but=("model", "name", "download"))

    def keywords(self) -> dict[str, Any]:
        """Keywords for ``session.load``: the options, the name and ``download``."""
        return _given(self, but=("model",))


@dataclass(frozen=True)
class StatusCall:
    """``%nbollama status [NAME]``: every engine, or the one called NAME."""

    name: str | None = None


@dataclass(frozen=True)
class UseCall:
    """``%nbollama use NAME``."""

    name: str


@dataclass(frozen=True)
class ModelsCall:
    """``%nbollama models [FOLDER ...]``."""

    folders: tuple[str, ...] = ()


@dataclass(frozen=True)
class CacheCall:
    """``%nbollama cache [clear [--model NAME] [--older-than AGE]] [--dir PATH]``."""

    clear: bool = False
    model: str | None = None
    older_than: float | None = None  # seconds
    directory: str | None = None


@dataclass(frozen=True)
class EvalCall:
    """``%nbollama eval TASKS``: lm-eval task names, and how much of each, on which engines."""

    tasks: tuple[str, ...]
    limit: int | float | None = None  # questions per task (a fraction below 1)
    num_fewshot: int | None = None
    include_paths: tuple[str, ...] = ()  # folders of task YAMLs, looked in first
    engines: tuple[str, ...] = ()  # engine names; () the kernel's engine
    out: str | None = None


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
    kv_types: tuple[str, ...] | None = None


@dataclass(frozen=True)
class UnloadCall:
    """``%nbollama unload [NAME]``."""

    name: str | None = None


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
    name: str | None = None  # --as NAME

    def options(self) -> dict[str, Any]:
        """Keywords for ``session.connect``: only those given."""
        return _given(self, but=("url",))

    def __repr__(self) -> str:
        from ..remote import redact_url

        return f"ConnectCall(url={redact_url(self.url)!r}, kind={self.kind!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"


@dataclass(frozen=True)
class DisconnectCall:
    """``%nbollama disconnect [NAME]``."""

    name: str | None = None


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
    | UseCall
    | ModelsCall
    | EvalCall
    | CacheCall
    | HelpCall
)


def _given(call: Any, *, but: tuple[str, ...]) -> dict[str, Any]:
    """A call's fields, all but those in ``but``, that were given (not None), in their order."""
    values = ((f.name, getattr(call, f.name)) for f in fields(call) if f.name not in but)
    return {name: value for name, value in values if value is not None}


def _remote_kinds() -> tuple[str, ...]:
    from ..remote import KINDS

    return KINDS


def _on_off(text: str) -> bool:
    """``--jump-forward on|off``."""
    if text.lower() not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r} is not on or off")
    return text.lower() == "on"


_SWITCHES = ("flash_attn", "jump_forward")  # on|off in the magic, True/False in Python


def _check_load_options(prog: str, **options: Any) -> None:
    try:
        LoadOptions.check(**options)
    except InvalidParamsError as exc:  # LoadOptions' rule, in the options' words
        raise UsageError(f"{prog}: {in_option_words(str(exc), LoadOptions.__dataclass_fields__, _SWITCHES)}") from None


def parse_nbollama(line: str) -> NbollamaCall:
    """The ``%nbollama`` line as a checked call; a bad argument is a UsageError here."""
    parser, subs = _nbollama_parser(dashboard=widgets_available())
    args = parser.parse_args(shell_split(line, parser.prog))
    command = args.command or "help"
    if command == "load":
        load = LoadCall(
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
            kv_type=args.kv_type,
            kv_type_v=args.kv_type_v,
            flash_attn=args.flash_attn,
            jump_forward=args.jump_forward,
            cache_ram=args.cache_ram,
            name=args.name,
            download=args.download,
        )
        _check_load_options("%nbollama load", **load.options())
        return load
    if command == "status":
        return StatusCall(args.name)
    if command == "use":
        return UseCall(args.name)
    if command == "models":
        return ModelsCall(tuple(args.folders))
    if command == "eval":
        names = tuple(dict.fromkeys(t.strip() for raw in args.tasks for t in raw.split(",") if t.strip()))
        if not names:
            raise UsageError("%nbollama eval: give task names, e.g. nbollama_mc,nbollama_gen")
        return EvalCall(names, args.limit, args.num_fewshot, tuple(args.include_path), args.engines, args.out)
    if command == "cache":
        if args.action != "clear" and (args.model is not None or args.older_than is not None):
            raise UsageError("%nbollama cache: --model and --older-than choose what `cache clear` removes")
        return CacheCall(args.action == "clear", args.model, args.older_than, args.directory)
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
            kv_types=args.kv_types,
        )
    if command == "unload":
        return UnloadCall(args.name)
    if command == "connect":
        call = ConnectCall(
            url=args.url,
            kind=args.kind,
            model=args.model,
            api_key_env=args.api_key_env,
            max_inflight=args.max_inflight,
            timeout=args.timeout,
            ca_bundle=args.ca_bundle,
            name=args.name,
        )
        from ..remote import check_connect

        try:
            check_connect(call.url, **_given(call, but=("url", "name")))  # the URL, the key's variable, the CA file
        except InvalidParamsError as exc:
            raise UsageError(f"%nbollama connect: {exc}") from None
        return call
    if command == "disconnect":
        return DisconnectCall(args.name)
    return HelpCall(tuple((usage_line(sub), COMMANDS[name]) for name, sub in subs.items()))
