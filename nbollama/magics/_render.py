"""Turning state into output: a cell's per-prompt cards, a big cell's compact view, the help texts.

Pure functions of handles, results and progress states (no engine calls, no
threads), so what a user sees is decided in one place and the same whether
the live display, the final display or a test asks for it.
"""

from __future__ import annotations

import html
import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .._api.progress import ProgressState, progress_bundle, progress_html, progress_text, short
from .._api.snapshot import BADGE_FOR_REASON
from .._api.tokenview import token_view_html
from .._palette import badge_html
from ..engine import Handle, Result
from ..results import Results
from ._parse_generate import GenerateHelpCall
from ._parse_nbollama import HelpCall

__all__ = [
    "CARDS_MAX",
    "live_bundle",
    "final_bundle",
    "big_live_bundle",
    "big_final_bundle",
    "nbollama_help",
    "generate_help",
    "default_loaded_message",
    "default_loaded_for_bench_message",
    "applied_message",
    "applied_inflight_message",
    "unloaded_message",
    "disconnected_message",
    "NO_ENGINE_MESSAGE",
]

_PREVIEW_CHARS = 60
_TITLE_CHARS = 2000
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]<>()#+\-.!|])")

NO_ENGINE_MESSAGE = "nbollama: no engine is loaded (%nbollama load loads one)"
#: A cell with more prompts than this shows one compact progress view, not a card per prompt
#: (``--cards`` forces the cards): its output stays a few KB whatever the number of prompts.
CARDS_MAX = 16


# -- printed lines -----------------------------------------------------------------------------


def default_loaded_message(summary: str) -> str:
    """What ``%%generate`` prints when it had to load the bundled model first."""
    return f"nbollama: no engine was loaded, so the bundled model was loaded: {summary.removeprefix('nbollama: ')}"


def default_loaded_for_bench_message(summary: str) -> str:
    """What ``%nbollama bench`` prints when it had to load the bundled model first."""
    return f"nbollama: no engine was loaded, so the bundled model was: {summary}"


def applied_message(parallel: int, summary: str) -> str:
    """What ``%nbollama bench --apply`` prints once the engine runs at the recommended value."""
    return f"nbollama: applied parallel={parallel}: {summary.removeprefix('nbollama: ')}"


def applied_inflight_message(n: int, url: str) -> str:
    """What ``%nbollama bench --apply`` prints on a remote engine (the server's own setting is its admin's)."""
    return (
        f"nbollama: this kernel now sends at most {n} requests at once to {url} "
        "(the server's own setting is above, to give its admin)"
    )


def disconnected_message(what: str | None) -> str:
    """What ``%nbollama disconnect`` prints: which server was let go, or what was closed."""
    if what is None:
        return "nbollama: no engine was loaded"
    return f"nbollama: {what}"


def unloaded_message(had_engine: bool, name: str | None = None) -> str:
    """What ``%nbollama unload [NAME]`` prints."""
    which = f"engine {name!r}" if name else "engine"
    if not had_engine:
        return f"nbollama: no {which} was loaded" if name else "nbollama: no engine was loaded"
    return f"nbollama: {which} closed, its memory freed"


# -- one cell's prompts ------------------------------------------------------------------------


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
    elide: int = 0  # leading prompt characters every prompt of the cell shares
    result: Result | None = None  # once finished: its choice, parsed output and logprobs


def _figures(result: Result) -> str:
    n = result.completion_tokens
    parts = [f"{n} token{'' if n == 1 else 's'}"]
    if result.ttft is not None:
        parts.append(f"TTFT {result.ttft * 1000:.0f} ms")
    if result.gen_tps:
        parts.append(f"{result.gen_tps:.1f} tok/s")
    if result.queue_wait >= 0.05:
        parts.append(f"queued {result.queue_wait:.2f} s")
    if result.perplexity is not None:
        parts.append(f"perplexity {result.perplexity:.2f}")
    if result.prompt_perplexity is not None:  # every prompt token needed a row: no prefix reuse
        parts.append(f"prompt perplexity {result.prompt_perplexity:.2f} (prompt prefilled whole)")
    parts.append(result.finish_reason)
    return " · ".join(parts)


def _final_view(number: int, result: Result, elide: int = 0) -> _View:
    return _View(
        number=number,
        prompt=result.prompt,
        status=BADGE_FOR_REASON[result.finish_reason],
        slot=result.slot,
        text=result.text,
        figures=_figures(result),
        error=result.error if result.finish_reason == "error" else None,
        elide=elide,
        result=result,
    )


def _live_view(number: int, item: Handle | Result | str, elide: int = 0) -> _View:
    """A prompt's area: from its result, its handle, or (not sent yet) its prompt alone."""
    if isinstance(item, Result):
        return _final_view(number, item, elide)
    if isinstance(item, str):
        return _View(number, item, "queued", None, "", "not sent yet", elide=elide)
    if item.done():
        return _final_view(number, item.result(), elide)
    return _View(
        number=number,
        prompt=item.prompt,
        status=item.status,
        slot=item.slot,
        text=item.text,
        figures=f"{item.completion_tokens}/{item.max_tokens} tokens",
        elide=elide,
    )


def _preview(prompt: str, elide: int = 0) -> str:
    return short(prompt, _PREVIEW_CHARS, elide)


def _head_text(view: _View) -> str:
    slot = "–" if view.slot is None else str(view.slot)
    return f"#{view.number} [{view.status} · slot {slot}] {_preview(view.prompt, view.elide)}"


def _card_html(view: _View) -> str:
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
        f"<b>#{view.number}</b>{badge_html(view.status, style='inline')}"
        f'<span style="white-space:nowrap">slot {slot}</span>'
        f'<span title="{html.escape(view.prompt[:_TITLE_CHARS], quote=True)}" style="flex:1;'
        f'min-width:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap">'
        f"{html.escape(_preview(view.prompt, view.elide))}</span></div>"
        f"{_answer_html(view)}"
        '<div class="nbollama-figures" style="font-size:11px;color:var(--jp-ui-font-color2,#777)">'
        f"{html.escape(view.figures)}</div>{error}</div>"
    )


def _answer_html(view: _View) -> str:
    """The card's middle: the choice's bars, the text (as its tokens when logprobs were asked),
    the parsed output."""
    result = view.result
    parts = []
    if result is not None and result.choice is not None:
        parts.append(_choice_html(result))
    if result is not None and result.logprobs is not None:
        body: str | None = token_view_html(
            result.logprobs, prompt_logprobs=result.prompt_logprobs, summary=False
        )
    elif result is not None and result.choice is not None and _same(view.text, result.choice):
        body = None  # the choice's bars say it
    else:
        body = html.escape(view.text)  # an empty area too: it fills as the text streams
    if body is not None:
        parts.append(
            '<div class="nbollama-text" style="white-space:pre-wrap;word-break:break-word;'
            "font-family:var(--jp-code-font-family,monospace);font-size:var(--jp-code-font-size,13px);"
            f'margin:4px 0;max-height:24em;overflow-y:auto">{body}</div>'
        )
    if result is not None:
        parts.append(_parsed_html(result))
    return "".join(parts)


def _same(text: str, choice: str) -> bool:
    return not text.strip() or text.strip() == choice.strip()


def _choice_html(result: Result) -> str:
    """Every option's probability over the options, as bars; the choice marked."""
    probs = dict(result.choice_probs or {})
    if not probs and result.choice is not None:
        probs = {result.choice: float("nan")}
    cells = []
    for option, p in probs.items():
        chosen = option == result.choice
        width = 0.0 if p != p else max(0.0, min(100.0, p * 100))
        shown = "" if p != p else f"{p:.1%}"
        weight = "font-weight:700;" if chosen else ""
        cells.append(
            f'<span style="color:#2e7d32;font-weight:700">{"✓" if chosen else ""}</span>'
            f'<span title="{html.escape(option, quote=True)}" style="{weight}min-width:0;white-space:pre;'
            f'overflow:hidden;text-overflow:ellipsis;font-family:var(--jp-code-font-family,monospace)">'
            f"{html.escape(option)}</span>"
            '<span style="height:8px;background:var(--jp-layout-color3,#e0e0e0);border-radius:4px;'
            f'overflow:hidden"><span style="display:block;height:100%;width:{width:.1f}%;'
            f'background:{"#1e88e5" if chosen else "#90a4ae"}"></span></span>'
            f'<span style="{weight}text-align:right;font-variant-numeric:tabular-nums">{shown}</span>'
        )
    return (
        '<div class="nbollama-choice" style="display:grid;grid-template-columns:1em '
        "fit-content(45%) minmax(4em,1fr) 3.5em;gap:2px 6px;align-items:center;"
        f'font-size:12px;margin:4px 0">{"".join(cells)}</div>'
    )


_FIELD_CHARS = 200


def _fields_of(parsed: Any) -> Mapping[str, Any] | None:
    if isinstance(parsed, Mapping):
        return parsed
    dump = getattr(parsed, "model_dump", None)
    value = dump() if callable(dump) else None
    return value if isinstance(value, Mapping) else None


def _parsed_html(result: Result) -> str:
    """A format's outcome: the parsed output's top-level fields, or why it did not parse."""
    if result.parse_error is not None:
        return (
            '<div class="nbollama-parsed" style="color:#c62828;font-size:12px;margin:2px 0">'
            f"not parsed: {html.escape(result.parse_error)}</div>"
        )
    parsed = result.parsed
    if parsed is None or isinstance(parsed, str):
        return ""  # no format asked, or a regex/grammar: the text above is the output
    fields = _fields_of(parsed)
    kind = "dict" if isinstance(parsed, Mapping) else type(parsed).__name__
    if fields is None:
        rows = f'<code style="white-space:pre-wrap">{html.escape(_shorten(parsed))}</code>'
    else:
        rows = "".join(
            f'<span style="color:var(--jp-ui-font-color2,#666)">{html.escape(str(k))}</span>'
            f'<code style="white-space:pre-wrap;word-break:break-word;background:none">'
            f"{html.escape(_shorten(v))}</code>"
            for k, v in fields.items()
        )
        rows = (
            '<div style="display:grid;grid-template-columns:max-content 1fr;gap:1px 8px">'
            f"{rows}</div>"
        )
    return (
        '<div class="nbollama-parsed" style="font-size:12px;margin:4px 0;padding:3px 6px;'
        'border-left:3px solid #2e7d32;background:var(--jp-layout-color2,#f5f5f5)">'
        f'<div style="color:#2e7d32;font-size:11px">parsed ({html.escape(kind)})</div>{rows}</div>'
    )


def _shorten(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _FIELD_CHARS else text[: _FIELD_CHARS - 1] + "…"


def _html(views: Sequence[_View]) -> str:
    columns = "1fr" if len(views) == 1 else "repeat(auto-fill,minmax(280px,1fr))"
    cards = "".join(_card_html(v) for v in views)
    return f'<div class="nbollama-generate" style="display:grid;grid-template-columns:{columns};gap:8px">{cards}</div>'


def _extras_text(view: _View) -> list[str]:
    """The choice and the parsed output as lines, for the plain-text and Markdown twins."""
    result = view.result
    if result is None:
        return []
    lines = []
    if result.choice is not None:
        probs = result.choice_probs or {}
        shown = [f"{o} {p:.1%}" for o, p in probs.items() if o != result.choice]
        p = probs.get(result.choice)
        lines.append(
            f"choice: {result.choice}"
            + ("" if p is None else f" ({p:.1%})")
            + (f"; {', '.join(shown)}" if shown else "")
        )
    if result.parse_error is not None:
        lines.append(f"not parsed: {result.parse_error}")
    elif result.parsed is not None and not isinstance(result.parsed, str):
        fields = _fields_of(result.parsed)
        lines.append(f"parsed: {_shorten(result.parsed if fields is None else dict(fields))}")
    return lines


def _plain(views: Sequence[_View]) -> str:
    blocks = []
    for v in views:
        block = "\n".join([_head_text(v), *_extras_text(v), v.text, f"({v.figures})"])
        if v.error:
            block += f"\nerror: {v.error}"
        blocks.append(block)
    return "\n\n".join(blocks)


def _markdown(views: Sequence[_View]) -> str:
    parts = []
    for v in views:
        head = _MARKDOWN_SPECIALS.sub(r"\\\1", _head_text(v))
        body = v.text if v.text.strip() else "*(no text)*"
        extras = "".join(_MARKDOWN_SPECIALS.sub(r"\\\1", line) + "\n\n" for line in _extras_text(v))
        body = extras + body
        tail = _MARKDOWN_SPECIALS.sub(
            r"\\\1", v.figures + (f" · error: {v.error}" if v.error else "")
        )
        parts.append(f"**{head}**\n\n{body}\n\n<sub>{tail}</sub>")
    return "\n\n---\n\n".join(parts)


def live_bundle(items: Sequence[Handle | Result | str], *, elide: int = 0) -> dict[str, str]:
    """The display of a cell's prompts while they run: HTML cards and their plain-text twin.

    Each item is a prompt's handle, its result once finished, or the prompt
    itself while it waits to be sent; ``elide`` leading characters every
    prompt shares are shown as "…" in the headers.
    """
    views = [_live_view(i + 1, item, elide) for i, item in enumerate(items)]
    return {"text/html": _html(views), "text/plain": _plain(views)}


def final_bundle(results: Sequence[Result], *, markdown: bool, elide: int = 0) -> dict[str, str]:
    """The display a cell keeps: each prompt's text and figures (as Markdown with ``--markdown``)."""
    views = [_final_view(i + 1, r, elide) for i, r in enumerate(results)]
    if markdown:
        return {"text/markdown": _markdown(views), "text/plain": _plain(views)}
    return {"text/html": _html(views), "text/plain": _plain(views)}


# -- a big cell: one compact view -----------------------------------------------------------------


def big_live_bundle(state: ProgressState) -> dict[str, str]:
    """A big cell while it runs: the progress bar, the slots' prompts, the latest results."""
    return progress_bundle(state)


def big_final_bundle(
    state: ProgressState, results: Results, *, out: str | None, table: bool
) -> dict[str, str]:
    """What a big cell keeps: the finished bar and, with ``table``, the results' summary table.

    The summary (finish reasons, percentiles, first and last rows) is the
    cell's value in the foreground, so it is shown here only for a background
    cell. Every row stays in ``--out VAR`` and ``Results.to_pandas()``.
    """
    state = replace(state, running=(), latest=())
    where = f"<code>{html.escape(out)}</code>" if out else "the cell's value"
    reasons = ", ".join(f"{n} {reason}" for reason, n in results.finish_reasons().items())
    tokens = (
        f"; <code>{html.escape(out or 'results')}[i].show()</code> shows row i's tokens"
        if any(r.logprobs is not None for r in results)
        else ""
    )
    note = (
        f'<div style="font-size:12px;color:var(--jp-ui-font-color2,#666)">{html.escape(reasons)}; '
        f"every result is in {where} (<code>.to_pandas()</code>){tokens}</div>"
    )
    body = progress_html(state) + note + (results._repr_html_() if table else "")
    text = progress_text(state) + f"\n{reasons}" + (f"\n{results!r}" if table else "")
    if tokens:
        text += f"\n{out or 'results'}[i].show() shows row i's tokens"
    html_out = f'<div class="nbollama-generate nbollama-generate-big">{body}</div>'
    return {"text/html": html_out, "text/plain": text}


# -- help ----------------------------------------------------------------------------------------


def nbollama_help(call: HelpCall) -> str:
    """``%nbollama help``: one usage line and one sentence per command."""
    lines = ["%nbollama COMMAND: manage the kernel's engine", ""]
    for usage, description in call.commands:
        lines += [f"  {usage}", f"      {description}"]
    lines += ["", "%%generate [options] / %generate [options] PROMPT: see %generate --help"]
    return "\n".join(lines)


def generate_help(call: GenerateHelpCall, doc: str) -> str:
    """``%generate --help``: the magic's docstring under its usage line (``--watch`` only if it exists)."""
    text = textwrap.dedent(doc.split("\n", 1)[1]) if "\n" in doc else doc
    summary = doc.split("\n", 1)[0]
    if not call.watch_available:
        text = re.sub(r"\n *--watch .*\n.*\(with nbollama\.widgets\)", "", text)
    return f"{summary}\n\nusage: {call.usage}\n{text}"
