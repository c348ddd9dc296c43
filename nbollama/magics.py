"""The notebook surface: ``%nbollama`` to manage the kernel's engine, ``%%generate`` to use it.

Both magics work on the kernel's engine (``nbollama.session``), so cells,
the dashboard and the side panel all look at the same slots. ``%%generate``
streams every prompt into its own area of one display, updated at most four
times a second with ``update_display_data``: that works in JupyterLab (and
Notebook 7) and under nbclient, with no widget involved.
"""

from __future__ import annotations

import argparse
import html
import importlib
import importlib.util
import keyword
import logging
import re
import shlex
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class, no_var_expand
from IPython.display import DisplayHandle, display
from IPython.utils.text import DollarFormatter

from . import session
from ._palette import BADGE_COLOURS
from .bench import SweepResult, sweep
from .engine import Engine, EngineSnapshot, Handle, Result
from .exceptions import ModelError, NbollamaError
from .memory import format_bytes
from .results import BackgroundGeneration, Results

__all__ = [
    "NbollamaMagics",
    "StatusReport",
    "interpolate",
    "split_prompts",
    "load_ipython_extension",
    "unload_ipython_extension",
]

logger = logging.getLogger("nbollama")

#: Seconds between two updates of a cell's live display (about 4 Hz, never per token).
REFRESH_SECONDS = 0.25
_PREVIEW_CHARS = 60
_TITLE_CHARS = 2000
_FINAL_STATUS = {"stop": "done", "length": "done", "cancelled": "cancelled", "error": "error"}
# `{name}` with a plain identifier, not part of a doubled `{{name}}` (templates keep theirs).
_FIELD = re.compile(r"(?<!\{)\{([^\W\d]\w*)\}(?!\})")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
_OPTION_LIKE = re.compile(r"-[A-Za-z-]")


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


# -- argument parsing ---------------------------------------------------------------------


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


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or a whole number") from None


def _parallel(text: str) -> int | str:
    value = _int_or_auto(text)
    if value != "auto" and int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 'auto' or >= 1")
    return value


def _parallel_list(text: str) -> list[int]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give parallel values as N,N,... (e.g. 1,2,4,8)")
    return [_positive_int(v) for v in values]


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


_COMMANDS: dict[str, str] = {
    "load": "load a model as the kernel's engine (replaces the current one)",
    "status": "slots, queue, throughput and memory, as a table",
    "dashboard": "a live dashboard of the kernel's engine",
    "bench": "measure throughput and latency at several parallel values; recommend one",
    "unload": "close the engine and free its memory",
    "help": "this help",
}


def _nbollama_parser(*, dashboard: bool) -> tuple[_Parser, dict[str, _Parser]]:
    """The parser and its subcommands; ``dashboard`` exists only when the widgets do."""
    parser = _Parser(prog="%nbollama", add_help=False, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs = {
        name: commands.add_parser(name, help=text, add_help=False, allow_abbrev=False)
        for name, text in _COMMANDS.items()
        if dashboard or name != "dashboard"
    }
    load = subs["load"]
    load.add_argument("model", nargs="?", default=None, metavar="MODEL")
    load.add_argument("--parallel", type=_parallel, default="auto", metavar="N|auto")
    load.add_argument("--ctx", type=_positive_int, metavar="N")
    load.add_argument("--gpu-layers", type=_int_or_auto, metavar="N|auto")
    load.add_argument("--threads", type=_positive_int, metavar="N")
    load.add_argument("--batch", type=_positive_int, metavar="N")
    bench = subs["bench"]
    bench.add_argument("--parallel", type=_parallel_list, default=[1, 2, 4, 8], metavar="N,N,...")
    bench.add_argument("--prompts", type=_positive_int, default=16, metavar="N")
    bench.add_argument("--max-tokens", type=_positive_int, default=64, metavar="N")
    bench.add_argument("--ctx", type=_positive_int, metavar="N")
    bench.add_argument("--apply", action="store_true")
    return parser, subs


# -- quiet loading -------------------------------------------------------------------------


class _DropSummary(logging.Filter):
    """Drop the engine's own summary line on this thread: the magic prints it itself."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.thread == self.thread
            and record.levelno == logging.INFO
            and record.getMessage().startswith("nbollama: model=")
        )


@contextmanager
def _summary_printed_here() -> Iterator[None]:
    drop = _DropSummary()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _load_engine(prog: str, model: str | None = None, **options: Any) -> Engine:
    """``session.load`` with model and parameter errors as one-line UsageErrors."""
    had_engine = session.current_engine() is not None
    try:
        with _summary_printed_here():
            return session.load(model, **options)
    except ModelError as exc:
        message = f"{prog}: cannot load {exc.path}: {exc.reason}"
    except NbollamaError as exc:
        message = f"{prog}: {exc}"
    if had_engine:
        if session.current_engine() is None:
            message += " (the previous engine was closed; no engine is loaded now)"
        else:
            message += " (the previous engine is still loaded)"
    raise UsageError(message)


# -- live display of one cell ---------------------------------------------------------------


@dataclass
class _View:
    """What one prompt's area shows at a moment."""

    number: int
    prompt: str
    status: str
    slot: int | None
    text: str
    figures: str
    error: str | None = None


def _figures(result: Result) -> str:
    n = result.completion_tokens
    parts = [f"{n} token{'' if n == 1 else 's'}"]
    if result.ttft is not None:
        parts.append(f"TTFT {result.ttft * 1000:.0f} ms")
    if result.gen_tps:
        parts.append(f"{result.gen_tps:.1f} tok/s")
    if result.queue_wait >= 0.05:
        parts.append(f"queued {result.queue_wait:.2f} s")
    parts.append(result.finish_reason)
    return " · ".join(parts)


def _final_view(number: int, result: Result) -> _View:
    return _View(
        number=number,
        prompt=result.prompt,
        status=_FINAL_STATUS[result.finish_reason],
        slot=result.slot,
        text=result.text,
        figures=_figures(result),
        error=result.error if result.finish_reason == "error" else None,
    )


def _live_view(number: int, handle: Handle) -> _View:
    if handle.done():
        return _final_view(number, handle.result())
    return _View(
        number=number,
        prompt=handle.prompt,
        status=handle.status,
        slot=handle.slot,
        text=handle.text,
        figures=f"{handle.completion_tokens}/{handle.max_tokens} tokens",
    )


def _preview(prompt: str) -> str:
    folded = " ".join(prompt.split())
    return folded if len(folded) <= _PREVIEW_CHARS else folded[: _PREVIEW_CHARS - 1] + "…"


def _head_text(view: _View) -> str:
    slot = "–" if view.slot is None else str(view.slot)
    return f"#{view.number} [{view.status} · slot {slot}] {_preview(view.prompt)}"


def _card_html(view: _View) -> str:
    colour = BADGE_COLOURS.get(view.status, "#9e9e9e")
    slot = "–" if view.slot is None else str(view.slot)
    error = (
        f'<div class="nbollama-error" style="color:#c62828;font-size:12px;margin-top:2px">'
        f"{html.escape(view.error)}</div>"
        if view.error
        else ""
    )
    return (
        f'<div class="nbollama-card" data-prompt="{view.number}" style="border:1px solid '
        'var(--jp-border-color2,#d0d0d0);border-radius:6px;padding:6px 8px;min-width:0">'
        '<div class="nbollama-head" style="display:flex;gap:6px;align-items:baseline;'
        'font-size:12px;color:var(--jp-ui-font-color2,#555)">'
        f'<b>#{view.number}</b><span class="nbollama-badge" style="background:{colour};color:#fff;'
        f'border-radius:8px;padding:0 6px">{view.status}</span><span>slot {slot}</span>'
        f'<span title="{html.escape(view.prompt[:_TITLE_CHARS], quote=True)}" style="flex:1;'
        f'min-width:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap">'
        f"{html.escape(_preview(view.prompt))}</span></div>"
        '<div class="nbollama-text" style="white-space:pre-wrap;word-break:break-word;'
        "font-family:var(--jp-code-font-family,monospace);font-size:var(--jp-code-font-size,13px);"
        f'margin:4px 0;max-height:24em;overflow-y:auto">{html.escape(view.text)}</div>'
        '<div class="nbollama-figures" style="font-size:11px;color:var(--jp-ui-font-color2,#777)">'
        f"{html.escape(view.figures)}</div>{error}</div>"
    )


def _html(views: Sequence[_View]) -> str:
    columns = "1fr" if len(views) == 1 else "repeat(auto-fill,minmax(280px,1fr))"
    cards = "".join(_card_html(v) for v in views)
    return f'<div class="nbollama-generate" style="display:grid;grid-template-columns:{columns};gap:8px">{cards}</div>'


def _plain(views: Sequence[_View]) -> str:
    blocks = []
    for v in views:
        block = f"{_head_text(v)}\n{v.text}\n({v.figures})"
        if v.error:
            block += f"\nerror: {v.error}"
        blocks.append(block)
    return "\n\n".join(blocks)


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]<>()#+\-.!|])")


def _markdown(views: Sequence[_View]) -> str:
    parts = []
    for v in views:
        head = _MARKDOWN_SPECIALS.sub(r"\\\1", _head_text(v))
        body = v.text if v.text.strip() else "*(no text)*"
        tail = _MARKDOWN_SPECIALS.sub(
            r"\\\1", v.figures + (f" · error: {v.error}" if v.error else "")
        )
        parts.append(f"**{head}**\n\n{body}\n\n<sub>{tail}</sub>")
    return "\n\n---\n\n".join(parts)


class _Run:
    """The requests of one ``%%generate`` cell and the display that shows them."""

    def __init__(
        self, shell: Any, handles: Sequence[Handle], *, live: bool, markdown: bool
    ) -> None:
        self.shell = shell
        self.handles = list(handles)
        self.live = live
        self.markdown = markdown
        self.display: DisplayHandle | None = None
        self.origin: dict[str, Any] | None = None  # the header of the cell that made the display
        self.all_done = threading.Event()
        self._remaining = len(self.handles)
        self._lock = threading.Lock()
        self._shown: tuple[object, ...] | None = None
        if not self.handles:
            self.all_done.set()
        for handle in self.handles:
            handle.add_done_callback(self._one_done)

    def _one_done(self, _handle: Handle) -> None:  # the engine's thread: keep it short
        with self._lock:
            self._remaining -= 1
            if self._remaining <= 0:
                self.all_done.set()

    def _state(self) -> tuple[object, ...]:
        return tuple((h.status, h.slot, h.completion_tokens, h.done()) for h in self.handles)

    def _live_bundle(self) -> dict[str, str]:
        views = [_live_view(i + 1, h) for i, h in enumerate(self.handles)]
        return {"text/html": _html(views), "text/plain": _plain(views)}

    def show(self) -> None:
        """The first display, from the cell's own thread so it belongs to that cell."""
        if not self.live:
            return
        self._shown = self._state()
        publisher = getattr(self.shell, "display_pub", None)
        if hasattr(publisher, "set_thread_parent"):
            self.origin = dict(publisher.parent_header)
        self.display = display(self._live_bundle(), raw=True, display_id=True)

    def _update(self, bundle: dict[str, str]) -> None:
        """``update_display_data`` that reaches the display from any thread, in any frontend.

        JupyterLab applies an update only in the output area of the cell whose
        request the message answers, so a background thread sends it as the
        cell that made the display (ipykernel's ``set_thread_parent``). nbclient
        only reads messages of the cell executing now (ipykernel's default for
        threads): when that is another cell, a second copy goes as that cell.
        """
        assert self.display is not None
        publisher = self.shell.display_pub
        if self.origin is None:
            self.display.update(bundle, raw=True)
            return
        current = dict(publisher.parent_header)
        token = publisher.set_thread_parent(self.origin)
        try:
            self.display.update(bundle, raw=True)
        finally:
            publisher.reset_thread_parent(token)
        if current.get("msg_id") != self.origin.get("msg_id"):
            self.display.update(bundle, raw=True)

    def refresh(self) -> None:
        """Update the display if anything changed since the last update."""
        if self.display is None:
            return
        state = self._state()
        if state == self._shown:
            return
        self._shown = state
        self._update(self._live_bundle())

    def pump(self) -> None:
        """Refresh at most every REFRESH_SECONDS until every request finished."""
        while not self.all_done.wait(REFRESH_SECONDS):
            self.refresh()

    def collect(self, timeout: float | None = None) -> Results:
        return Results(h.result(timeout) for h in self.handles)

    def show_final(self, results: Results) -> None:
        if self.display is None:
            return
        views = [_final_view(i + 1, r) for i, r in enumerate(results)]
        if self.markdown:
            bundle = {"text/markdown": _markdown(views), "text/plain": _plain(views)}
        else:
            bundle = {"text/html": _html(views), "text/plain": _plain(views)}
        self._update(bundle)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


def _freeze_when_done(handles: Sequence[Handle], board: Any) -> None:
    """A ``--watch`` dashboard stops updating (keeping its last state) once its cell's requests end."""
    for handle in handles:
        handle.result()
    board.stop()


def _drive_in_background(
    run: _Run, job: BackgroundGeneration, store: Callable[[Results], None]
) -> None:
    """The background thread of a ``--background`` cell: refresh, then finish the job."""
    try:
        run.pump()
    except Exception:
        logger.exception("nbollama: updating a background cell's display failed")
    results = run.collect()
    try:
        run.show_final(results)
    except Exception:
        logger.exception("nbollama: the final update of a background cell's display failed")
    store(results)
    job._complete(results)


# -- %nbollama status -----------------------------------------------------------------------


class StatusReport:
    """A snapshot of the engine as a table: what ``%nbollama status`` returns."""

    def __init__(self, snapshot: EngineSnapshot) -> None:
        self.snapshot = snapshot

    def _lines(self) -> dict[str, str]:
        s = self.snapshot
        memory = s["memory"]
        totals = s["totals"]
        kv = s["kv"]
        gpus = "; ".join(
            f"GPU {g['index']} {g['name']}: {format_bytes(g['used'])} / {format_bytes(g['total'])} used"
            + (
                f" (this process {format_bytes(g['process_used'])})"
                if g["process_used"] is not None
                else ""
            )
            for g in memory["gpus"]
        )
        host = (
            f"process RSS {format_bytes(memory['process_rss'])}, "
            f"host {format_bytes(memory['host_available'])} free of {format_bytes(memory['host_total'])}"
        )
        return {
            "model": f"{s['model']['name']} ({s['model']['arch']}, {format_bytes(s['model']['size_bytes'])}) — {s['model']['path']}",
            "parallel": f"{s['parallel']} slots × {s['ctx_per_slot']} ctx — {s['parallel_reason']}",
            "queue": f"{s['queue']['length']} waiting (max {s['queue']['max']}), {s['busy_slots']}/{s['parallel']} slots busy",
            "throughput": f"{s['throughput']:.1f} tok/s over the last {s['throughput_window']:.0f} s",
            "KV cache": f"{kv['used']}/{kv['total']} cells used, {format_bytes(kv['bytes'])} ({memory['kv_estimate']})",
            "memory": host
            + (f"; {gpus}" if gpus else "")
            + (f" — {memory['note']}" if memory["note"] else ""),
            "totals": (
                f"{totals['submitted']} submitted, {totals['completed']} completed, {totals['cancelled']} cancelled, "
                f"{totals['errors']} errors; {totals['prompt_tokens']} prompt + {totals['generated_tokens']} generated tokens"
            ),
        }

    def _slot_rows(self) -> list[list[str]]:
        rows = []
        for slot in self.snapshot["slots"]:
            busy = slot["state"] != "idle"
            rows.append(
                [
                    str(slot["id"]),
                    slot["badge"],
                    "" if slot["request_id"] is None else str(slot["request_id"]),
                    f"{slot['prefilled_tokens']}/{slot['prompt_tokens']}" if busy else "",
                    f"{slot['decoded_tokens']}/{slot['max_tokens']}" if busy else "",
                    f"{slot['tps']:.1f}" if busy else "",
                    str(slot["kv_used"]),
                    slot["prompt_preview"] if busy or slot["badge"] != "idle" else "",
                ]
            )
        return rows

    _HEADERS = (
        "slot",
        "state",
        "request",
        "prompt tok",
        "generated",
        "tok/s",
        "KV cells",
        "prompt",
    )

    def __repr__(self) -> str:
        lines = [f"nbollama engine{' (closed)' if self.snapshot['closed'] else ''}"]
        lines += [f"  {key:<10} {value}" for key, value in self._lines().items()]
        rows = [list(self._HEADERS), *self._slot_rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._HEADERS) - 1)]
        for row in rows:
            cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
            lines.append(
                "  " + "  ".join(cells) + "  " + textwrap.shorten(row[-1], 50, placeholder="…")
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        facts = "".join(
            f'<tr><th style="text-align:left;padding-right:1em">{html.escape(key)}</th>'
            f'<td style="text-align:left">{html.escape(value)}</td></tr>'
            for key, value in self._lines().items()
        )
        head = "".join(f'<th style="text-align:left">{h}</th>' for h in self._HEADERS)
        body = []
        for row in self._slot_rows():
            colour = BADGE_COLOURS.get(row[1], "#9e9e9e")
            badge = (
                f'<span style="background:{colour};color:#fff;border-radius:8px;padding:0 6px">'
                f"{html.escape(row[1])}</span>"
            )
            cells = [html.escape(row[0]), badge, *(html.escape(c) for c in row[2:])]
            body.append(
                "<tr>" + "".join(f'<td style="text-align:left">{c}</td>' for c in cells) + "</tr>"
            )
        closed = " (closed)" if self.snapshot["closed"] else ""
        return (
            f'<div class="nbollama-status"><b>nbollama engine{closed}</b>'
            f'<table class="nbollama-status-facts">{facts}</table>'
            f'<table class="nbollama-status-slots"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )


# -- the magics -----------------------------------------------------------------------------


@magics_class
class NbollamaMagics(Magics):
    """``%nbollama`` and ``%%generate``/``%generate``, registered by ``%load_ext nbollama``."""

    @line_magic("nbollama")
    def nbollama_magic(self, line: str) -> StatusReport | None:
        """Manage the kernel's engine: one model, N parallel slots.

        Usage::

            %nbollama load [MODEL] [--parallel N|auto] [--ctx N] [--gpu-layers N|auto]
                           [--threads N] [--batch N]
            %nbollama status
            %nbollama dashboard
            %nbollama bench [--parallel 1,2,4,8] [--prompts N] [--max-tokens N] [--ctx N] [--apply]
            %nbollama unload
            %nbollama help

        ``load`` replaces the kernel's engine (the old one's requests are
        cancelled and its memory freed first) and prints one line: the model,
        the effective number of slots and why, the context per slot, the KV
        cache size and the load time. MODEL is a ``.gguf`` path; without it,
        the bundled Gemma 3 270M. ``--ctx`` is the context of ONE slot: the KV
        cache holds parallel × ctx tokens. ``--parallel auto`` picks what fits
        in memory (``NBOLLAMA_NUM_PARALLEL`` overrides it).

        ``status`` shows slots, queue, throughput, KV cache and memory as a
        table; ``dashboard`` (with ``nbollama.widgets``) a live view of them;
        ``unload`` closes the engine and frees its memory.

        ``bench`` runs the parallelism sweep (``nbollama.bench.sweep``): for
        each value a fresh context on the same loaded weights, the same prompts
        fired at once; it shows the table (tok/s, TTFT, per-request tok/s, peak
        memory), the plot and the recommended value (the smallest within 10% of
        the best throughput); ``--apply`` switches the engine to it.

        Examples::

            %nbollama load
            %nbollama load ~/models/qwen2.5-0.5b-q4_k_m.gguf --parallel 4 --ctx 2048
            %nbollama status
        """
        parser, subs = _nbollama_parser(dashboard=_widgets_available())
        args = parser.parse_args(_shell_split(line, parser.prog))
        command = args.command or "help"
        if command == "load":
            options: dict[str, Any] = {"parallel": args.parallel}
            for name, key in (
                ("ctx", "ctx"),
                ("gpu_layers", "gpu_layers"),
                ("threads", "threads"),
                ("batch", "n_batch"),
            ):
                value = getattr(args, name)
                if value is not None:
                    options[key] = value
            engine = _load_engine("%nbollama load", args.model, **options)
            print(engine.summary)
            return None
        if command == "status":
            engine = session.current_engine()
            if engine is None:
                print("nbollama: no engine is loaded (%nbollama load loads one)")
                return None
            return StatusReport(engine.snapshot())
        if command == "dashboard":
            widgets = importlib.import_module("nbollama.widgets")
            display(widgets.dashboard())
            return None
        if command == "bench":
            return self._bench(args)
        if command == "unload":
            if session.unload():
                print("nbollama: engine closed, its memory freed")
            else:
                print("nbollama: no engine was loaded")
            return None
        print(_nbollama_help(subs))
        return None

    @no_var_expand
    @line_cell_magic("generate")
    def generate(self, line: str, cell: str | None = None) -> Results | BackgroundGeneration | None:
        """Generate with the kernel's engine: every prompt in its own slot, all at once.

        Usage::

            %%generate [options]
            first prompt
            ---
            second prompt

            %generate [options] PROMPT

        Prompts are separated by lines holding only ``---`` (``--lines``: one
        prompt per non-empty line). ``{name}`` is filled from the notebook's
        variables; unknown names, ``{{doubled}}`` braces, JSON and code are left
        as written (``--no-format`` turns filling off). ``--each VAR`` runs the
        cell once per item of the list ``VAR``, ``{item}`` being the item.

        Each prompt gets its own area: the prompt, the slot serving it and its
        state, the text as it streams (updated about 4 times a second), then
        its figures: tokens, time to first token, tokens/s, finish reason. A
        prompt that fails (say, too long for a slot) shows its error in its own
        area; the others go on. The cell's value is a ``Results`` list (``.texts``,
        ``.to_pandas()``). No engine loaded? The bundled model is loaded with
        ``parallel="auto"`` first.

        Options (``$name`` and ``{name}`` in this line are expanded, as in any magic)::

            --max-tokens N        tokens to generate per prompt (engine default 256)
            --temperature T       0 is greedy; --top-k K, --top-p P, --min-p P,
                                  --repeat-penalty R, --seed N as in llama.cpp
            --stop TEXT           stop at TEXT (repeatable)
            --chat / --raw        through the model's chat template, or as written (default)
            --system TEXT         a system message (implies --chat)
            --priority N          higher is served first when slots are busy
            --out VAR             also store the Results in VAR
            --each VAR            one prompt per item of VAR, {item} in the template
            --lines               one prompt per non-empty line
            --no-format           leave {name} as written ({item} is still filled)
            -b, --background      return at once with a BackgroundGeneration (.done(),
                                  .wait(), .cancel()), also stored in --out VAR; the
                                  cell's output keeps streaming and VAR becomes the
                                  Results when it finishes
            --markdown            render the final texts as Markdown
            --quiet               no live output, only the value
            --watch               a compact engine dashboard above the outputs
                                  (with nbollama.widgets)

        Ctrl-C (interrupt the kernel) cancels the cell's requests and frees their
        slots; what was generated stays visible, marked "cancelled", and is stored
        in ``--out VAR`` as a partial ``Results``. The KeyboardInterrupt is then
        re-raised, as with any interrupted cell, so "Run all" stops there. A
        ``--background`` cell is not interrupted by Ctrl-C: use ``.cancel()``.

        Examples::

            %%generate --max-tokens 64 --temperature 0.7 --seed 1 --out answers
            Explain continuous batching in one sentence.
            ---
            Write a haiku about {topic}.

            %%generate --each cities --max-tokens 16
            The capital of {item} is

            %generate --max-tokens 32 What's a KV cache?
        """
        spec = _generate_parser(line=cell is None)
        prog = spec.parser.prog
        if cell is None:
            tokens, body = _split_line_form(line, spec)
        else:
            # IPython's $name / {name} expansion, for the options line only: the
            # body's {name} filling is ours, and the line form's prompt is verbatim.
            line = self.shell.var_expand(line, formatter=DollarFormatter())
            tokens, body = _shell_split(line, prog), cell
        args = spec.parser.parse_args(tokens)
        if args.help:
            print(_generate_help(spec.parser, self.generate.__doc__ or ""))
            return None
        if args.system is not None and args.chat is False:
            raise UsageError(
                f"{prog}: --system needs --chat (the system message goes through the chat template)"
            )

        namespace: Mapping[str, Any] = {} if args.no_format else self.shell.user_ns
        templates = [body.strip()] if cell is None else split_prompts(body, lines=args.lines)
        templates = [t for t in templates if t]
        if not templates:
            where = "a prompt after the options" if cell is None else "a prompt in the cell"
            raise UsageError(f"{prog}: nothing to generate: write {where}")
        if args.each is not None:
            items = self._items(prog, args.each)
            prompts = [
                interpolate(t, namespace, {"item": item}) for item in items for t in templates
            ]
        else:
            prompts = [interpolate(t, namespace) for t in templates]

        params: dict[str, Any] = {"priority": args.priority}
        for name in (
            "max_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repeat_penalty",
            "seed",
        ):
            value = getattr(args, name)
            if value is not None:
                params[name] = value
        if args.stop:
            params["stop"] = tuple(args.stop)
        if args.system is not None:
            params["system"] = interpolate(args.system, namespace)
            params["chat"] = True
        elif args.chat is not None:
            params["chat"] = args.chat

        engine = session.current_engine()
        if engine is None:
            engine = _load_engine(prog, parallel="auto")
            summary = engine.summary.removeprefix("nbollama: ")
            print(f"nbollama: no engine was loaded, so the bundled model was loaded: {summary}")
        handles = self._submit(prog, engine, prompts, params)
        if getattr(args, "watch", False):
            widgets = importlib.import_module("nbollama.widgets")
            board = widgets.dashboard(engine, compact=True)
            display(board)
            threading.Thread(
                target=_freeze_when_done, args=(handles, board), name="nbollama-watch", daemon=True
            ).start()
        run = _Run(self.shell, handles, live=not args.quiet, markdown=args.markdown)
        if args.background:
            return self._background(run, args.out)
        return self._foreground(run, args.out)

    # -- helpers ----------------------------------------------------------------------

    def _items(self, prog: str, name: str) -> list[Any]:
        namespace = self.shell.user_ns
        if name not in namespace:
            raise UsageError(
                f"{prog}: --each {name}: there is no variable {name!r} in the notebook"
            )
        value = namespace[name]
        if isinstance(value, (str, bytes)):
            raise UsageError(
                f"{prog}: --each {name}: wants a list of items, but {name} is of type {type(value).__name__}"
            )
        try:
            items = list(value)
        except TypeError:
            raise UsageError(
                f"{prog}: --each {name}: wants a list of items, but {name} is of type {type(value).__name__}"
            ) from None
        if not items:
            raise UsageError(f"{prog}: --each {name}: {name} is empty")
        return items

    @staticmethod
    def _submit(
        prog: str, engine: Engine, prompts: Sequence[str], params: Mapping[str, Any]
    ) -> list[Handle]:
        """Queue every prompt, or none: a bad parameter or a full queue stops the whole cell."""
        handles: list[Handle] = []
        try:
            for prompt in prompts:
                handles.append(engine.submit(prompt, **params))
        except NbollamaError as exc:
            for handle in handles:
                handle.cancel()
            raise UsageError(f"{prog}: {exc}") from None
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    def _bench(self, args: argparse.Namespace) -> SweepResult:
        engine = session.current_engine()
        if engine is None:
            engine = _load_engine("%nbollama bench")
            print(f"nbollama: no engine was loaded, so the bundled model was: {engine.summary}")
        try:
            result = sweep(
                engine, parallel=args.parallel, n_prompts=args.prompts, max_tokens=args.max_tokens, ctx=args.ctx
            )
        except ValueError as exc:
            raise UsageError(f"%nbollama bench: {exc}") from None
        import plotly.io as pio

        # plotly picks its renderer when first imported; imported outside a kernel it has none
        pio.show(result.figure(), renderer=pio.renderers.default or "plotly_mimetype+notebook")
        if args.apply:
            with _summary_printed_here():
                applied = engine.spawn(parallel=result.recommended, ctx=engine.ctx)
            session.set_engine(applied)  # the old context closes; the weights stay loaded
            print(f"nbollama: applied parallel={result.recommended}: {applied.summary}")
        return result

    def _store(self, name: str | None, value: Results | BackgroundGeneration) -> None:
        if name is not None:
            self.shell.user_ns[name] = value

    def _foreground(self, run: _Run, out: str | None) -> Results:
        try:
            run.show()
            run.pump()
        except KeyboardInterrupt:
            run.cancel()
            try:
                results = run.collect(timeout=10)
            except TimeoutError:
                logger.warning("nbollama: cancelled requests did not finish within 10 s")
                raise KeyboardInterrupt from None
            run.show_final(results)
            self._store(out, results)
            raise
        results = run.collect()
        run.show_final(results)
        self._store(out, results)
        return results

    def _background(self, run: _Run, out: str | None) -> BackgroundGeneration:
        job = BackgroundGeneration(run.handles, out=out)
        self._store(out, job)  # the handle now; the Results replace it when done
        try:
            run.show()
        except BaseException:
            run.cancel()
            raise
        thread = threading.Thread(
            target=_drive_in_background,
            args=(run, job, lambda results: self._store(out, results)),
            name="nbollama-generate-background",
            daemon=True,
        )
        thread.start()
        return job


def _nbollama_help(subs: Mapping[str, _Parser]) -> str:
    lines = ["%nbollama COMMAND: manage the kernel's engine", ""]
    for name, sub in subs.items():
        usage = " ".join(sub.format_usage().split()).removeprefix("usage: ")
        lines += [f"  {usage}", f"      {_COMMANDS[name]}"]
    lines += ["", "%%generate [options] / %generate [options] PROMPT: see %generate --help"]
    return "\n".join(lines)


def _generate_help(parser: _Parser, doc: str) -> str:
    usage = " ".join(parser.format_usage().split()).removeprefix("usage: ")
    text = textwrap.dedent(doc.split("\n", 1)[1]) if "\n" in doc else doc
    summary = doc.split("\n", 1)[0]
    if "--watch" not in parser.format_usage():
        text = re.sub(r"\n *--watch .*\n.*\(with nbollama\.widgets\)", "", text)
    return f"{summary}\n\nusage: {usage}\n{text}"


# -- the extension --------------------------------------------------------------------------


def _comm(action: str, ipython: Any) -> None:
    """The side panel's comm target (``nbollama.comm``) comes along when that module exists."""
    if importlib.util.find_spec("nbollama.comm") is None:
        return
    comm = importlib.import_module("nbollama.comm")
    getattr(comm, action)(ipython)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbollama``: register the magics and the side panel's comm target."""
    ipython.register_magics(NbollamaMagics(ipython))
    _comm("register", ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbollama``: close the engine, then remove the magics and the comm target."""
    session.unload()
    manager = ipython.magics_manager
    instance = manager.registry.pop(NbollamaMagics.__name__, None)
    if instance is not None:
        for table in manager.magics.values():
            for name, function in list(table.items()):
                if getattr(function, "__self__", None) is instance:
                    del table[name]
    _comm("unregister", ipython)
