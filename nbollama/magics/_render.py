"""Turning state into output: a cell's per-prompt cards, a big cell's compact view, the help texts.

Pure functions of handles, results and progress states (no engine calls, no
threads), so what a user sees is decided in one place and the same whether
the live display, the final display or a test asks for it.
"""

from __future__ import annotations

import html
import re
import textwrap
from collections.abc import Sequence
from dataclasses import replace

from .._api.cards import CardView, cards_html, extras_text, final_view, head_text, plain_text
from .._api.progress import ProgressState, progress_bundle, progress_html, progress_text
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


def _live_view(number: int, item: Handle | Result | str, elide: int = 0) -> CardView:
    """A prompt's area: from its result, its handle, or (not sent yet) its prompt alone."""
    if isinstance(item, Result):
        return final_view(number, item, elide)
    if isinstance(item, str):
        return CardView(number, item, "queued", None, "", "not sent yet", elide=elide)
    if item.done():
        return final_view(number, item.result(), elide)
    return CardView(
        number=number,
        prompt=item.prompt,
        status=item.status,
        slot=item.slot,
        text=item.text,
        figures=f"{item.completion_tokens}/{item.max_tokens} tokens",
        elide=elide,
    )


def _markdown(views: Sequence[CardView]) -> str:
    parts = []
    for v in views:
        head = _MARKDOWN_SPECIALS.sub(r"\\\1", head_text(v))
        body = v.text if v.text.strip() else "*(no text)*"
        extras = "".join(_MARKDOWN_SPECIALS.sub(r"\\\1", line) + "\n\n" for line in extras_text(v))
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
    return {"text/html": cards_html(views), "text/plain": plain_text(views)}


def final_bundle(results: Sequence[Result], *, markdown: bool, elide: int = 0) -> dict[str, str]:
    """The display a cell keeps: each prompt's text and figures (as Markdown with ``--markdown``)."""
    views = [final_view(i + 1, r, elide) for i, r in enumerate(results)]
    if markdown:
        return {"text/markdown": _markdown(views), "text/plain": plain_text(views)}
    return {"text/html": cards_html(views), "text/plain": plain_text(views)}


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
