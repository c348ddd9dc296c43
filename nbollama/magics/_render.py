"""Turning state into output: a cell's per-prompt cards, the help texts, ``%nbollama status``.

Pure functions of handles, results and snapshots (no engine calls, no
threads), so what a user sees is decided in one place and the same whether
the live display, the final display or a test asks for it.
"""

from __future__ import annotations

import html
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .._palette import BADGE_COLOURS
from .._progress import ProgressState, progress_bundle, progress_html, progress_text, short
from ..engine import EngineSnapshot, Handle, Result
from ..memory import format_bytes
from ..results import Results
from ._parse import GenerateHelpCall, HelpCall

__all__ = [
    "StatusReport",
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
_FINAL_STATUS = {"stop": "done", "length": "done", "cancelled": "cancelled", "error": "error"}
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


def unloaded_message(had_engine: bool) -> str:
    """What ``%nbollama unload`` prints."""
    return (
        "nbollama: engine closed, its memory freed"
        if had_engine
        else "nbollama: no engine was loaded"
    )


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


def _final_view(number: int, result: Result, elide: int = 0) -> _View:
    return _View(
        number=number,
        prompt=result.prompt,
        status=_FINAL_STATUS[result.finish_reason],
        slot=result.slot,
        text=result.text,
        figures=_figures(result),
        error=result.error if result.finish_reason == "error" else None,
        elide=elide,
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
        f'border-radius:8px;padding:0 6px">{view.status}</span><span style="white-space:nowrap">slot {slot}</span>'
        f'<span title="{html.escape(view.prompt[:_TITLE_CHARS], quote=True)}" style="flex:1;'
        f'min-width:0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap">'
        f"{html.escape(_preview(view.prompt, view.elide))}</span></div>"
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
    note = (
        f'<div style="font-size:12px;color:var(--jp-ui-font-color2,#666)">{html.escape(reasons)}; '
        f"every result is in {where} (<code>.to_pandas()</code>)</div>"
    )
    body = progress_html(state) + note + (results._repr_html_() if table else "")
    text = progress_text(state) + f"\n{reasons}" + (f"\n{results!r}" if table else "")
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


# -- %nbollama status ----------------------------------------------------------------------------


def _known(value: object, unit: str = "") -> str:
    """A figure, or "unknown" (a remote server does not give every figure)."""
    return "unknown" if value is None else f"{value}{unit}"


def _known_bytes(value: int | None) -> str:
    return "unknown" if value is None else format_bytes(value)


def _adaptive_line(snapshot: EngineSnapshot) -> str:
    """Adaptive parallelism: its target, the count now of the maximum, and the last few changes."""
    adaptive = snapshot["adaptive"]
    assert adaptive is not None
    start = adaptive["history"][0]["time"] if adaptive["history"] else snapshot["time"]
    changes = "; ".join(
        f"+{h['time'] - start:.0f} s → {h['parallel']}" for h in adaptive["history"][-6:]
    )
    return (
        f"target {adaptive['target']}, {snapshot['parallel']} of {snapshot['parallel_max']} slots take requests"
        + (f"; recent changes: {changes}" if changes else "; no change yet")
    )


def _prefix_cache_line(snapshot: EngineSnapshot) -> str:
    """Whether prompts reuse cached prefixes, and how much of all prompt tokens that saved."""
    cache = snapshot["prefix_cache"]
    if not cache["enabled"]:
        return "off (every prompt is prefilled in full)"
    totals = snapshot["totals"]
    return (
        f"on — hit rate {cache['hit_rate']:.0%}: {totals['cached_tokens']} of {totals['prompt_tokens']} "
        f"prompt tokens reused, {cache['shared_prefills']} prefixes shared across slots"
    )


class StatusReport:
    """A snapshot of the engine as a table: what ``%nbollama status`` returns."""

    def __init__(self, snapshot: EngineSnapshot) -> None:
        self.snapshot = snapshot

    @property
    def remote(self) -> bool:
        return self.snapshot.get("remote") is not None

    def _remote_lines(self) -> dict[str, str]:
        """The facts of a remote engine: what the server says, what this kernel measures, and the unknowns."""
        s = self.snapshot
        r = s["remote"]  # type: ignore[typeddict-item]
        model = s["model"]
        memory = s["memory"]
        kv = s["kv"]
        where = f"{s.get('kind', 'remote')}{' ' + r['version'] if r['version'] else ''} at {s.get('endpoint')}"
        if r["host_is_local"]:
            where += " (this machine)"
        if not r["reachable"]:
            where += f" — unreachable at the last look: {r['error']}"
        details = [
            part
            for part in (model["arch"], model["size_bytes"] and format_bytes(model["size_bytes"]))
            if part
        ]
        rows = (
            "server slots" if r["rows"] == "server slots" else "of this kernel's requests in flight"
        )
        server_queue = f"server: {_known(r['server_running'])} running, {_known(r['server_waiting'])} waiting (all clients)"
        kv_text = f"{_known(kv['used'])}/{_known(kv['total'])} tokens"
        if r["kv_usage"] is not None:
            kv_text += f", {r['kv_usage']:.0%} in use"
        if r["prefix_cache_hit_rate"] is not None:
            kv_text += f", server prefix-cache hit rate {r['prefix_cache_hit_rate']:.0%}"
        memory_parts = [
            f"GPU {g['index']} {g['name']}: {format_bytes(g['used'])} / {format_bytes(g['total'])} used"
            for g in memory["gpus"]
        ]
        memory_parts += [
            f"{m['name']}: {_known_bytes(m['size'])} (VRAM {_known_bytes(m['size_vram'])}), context {_known(m['context_length'])}"
            for m in r["models"]
        ]
        throughput = f"{s['throughput']:.1f} tok/s received by this kernel over the last {s['throughput_window']:.0f} s"
        if r["server_throughput"] is not None:
            throughput += f"; server {r['server_throughput']:.1f} tok/s (all clients)"
        if r["server_ttft"] is not None:
            throughput += f"; server mean TTFT {r['server_ttft']:.2f} s"
        totals = s["totals"]
        return {
            "server": where,
            "model": model["name"]
            + (f" ({', '.join(details)})" if details else "")
            + (f" — {model['path']}" if model["path"] else ""),
            "parallel": f"{_known(r['server_parallel'])} ({r['parallel_source']})",
            "context": f"{_known(s['ctx_per_slot'])} tokens per request",
            "this kernel": (
                f"at most {r['max_inflight']} in flight: {r['in_flight']} in flight, "
                f"{r['waiting']} waiting in nbollama's queue (max {s['queue']['max']})"
            ),
            "queue": f"{s['busy_slots']}/{s['parallel']} {rows} busy; {server_queue}",
            "throughput": throughput,
            "KV cache": kv_text,
            "memory": "; ".join(memory_parts + [memory["note"]]),
            "totals": (
                f"{totals['submitted']} submitted, {totals['completed']} completed, {totals['cancelled']} cancelled, "
                f"{totals['errors']} errors; {totals['prompt_tokens']} prompt + {totals['generated_tokens']} generated tokens"
            ),
        }

    def _lines(self) -> dict[str, str]:
        if self.remote:
            return self._remote_lines()
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
            "parallel": (
                f"{s['parallel']} of {s['parallel_max']} slots"
                if s.get("parallel_max", s["parallel"]) != s["parallel"]
                else f"{s['parallel']} slots"
            )
            + f" × {s['ctx_per_slot']} ctx — {s['parallel_reason']}"
            + (
                " — reproducible mode (tokens independent of the batch)"
                if s.get("reproducible")
                else ""
            ),
            "queue": f"{s['queue']['length']} waiting (max {s['queue']['max']}), {s['busy_slots']}/{s['parallel']} slots busy",
            "throughput": f"{s['throughput']:.1f} tok/s over the last {s['throughput_window']:.0f} s",
            "KV cache": f"{kv['used']}/{kv['total']} cells used, {format_bytes(kv['bytes'])} ({memory['kv_estimate']})",
            "prefix cache": _prefix_cache_line(s),
            **({"adaptive": _adaptive_line(s)} if s.get("adaptive") else {}),
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
        unknown = "?"
        for slot in self.snapshot["slots"]:
            busy = slot["state"] != "idle"
            prefilled = (
                unknown if slot["prefilled_tokens"] is None else str(slot["prefilled_tokens"])
            )
            prompt = unknown if slot["prompt_tokens"] is None else str(slot["prompt_tokens"])
            limit = unknown if slot["max_tokens"] is None else str(slot["max_tokens"])
            preview = slot["prompt_preview"]
            if self.remote and busy and slot.get("origin") == "another client":
                preview = preview or "(another client's request)"
            row = [
                str(slot["id"]),
                slot["badge"],
                "" if slot["request_id"] is None else str(slot["request_id"]),
                f"{prefilled}/{prompt}" if busy else "",
                f"{slot['decoded_tokens']}/{limit}" if busy else "",
                (unknown if slot["tps"] is None else f"{slot['tps']:.1f}") if busy else "",
                unknown if slot["kv_used"] is None else str(slot["kv_used"]),
                preview if busy or slot["badge"] != "idle" else "",
            ]
            if self.remote:
                row.insert(2, slot.get("origin", "this kernel") if busy else "")
            rows.append(row)
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

    @property
    def _headers(self) -> tuple[str, ...]:
        if self.remote:
            return (*self._HEADERS[:2], "client", *self._HEADERS[2:])
        return self._HEADERS

    @property
    def _title(self) -> str:
        if self.remote:
            return f"nbollama remote engine ({self.snapshot.get('kind')})"
        return "nbollama engine"

    def __repr__(self) -> str:
        lines = [f"{self._title}{' (closed)' if self.snapshot['closed'] else ''}"]
        lines += [
            f"  {key:<11} {value}" if self.remote else f"  {key:<10} {value}"
            for key, value in self._lines().items()
        ]
        headers = self._headers
        rows = [list(headers), *self._slot_rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(headers) - 1)]
        for row in rows:
            cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
            lines.append(
                "  " + "  ".join(cells) + "  " + textwrap.shorten(row[-1], 50, placeholder="…")
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        facts = "".join(
            f'<tr><th style="text-align:left;padding-right:1em;white-space:nowrap;vertical-align:top">'
            f"{html.escape(key)}</th>"
            f'<td style="text-align:left">{html.escape(value)}</td></tr>'
            for key, value in self._lines().items()
        )
        head = "".join(
            f'<th style="text-align:left;white-space:nowrap">{h}</th>' for h in self._headers
        )
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
            '<div class="nbollama-status"><div style="font-weight:bold;white-space:nowrap">'
            f"{html.escape(self._title)}{closed}</div>"
            f'<table class="nbollama-status-facts">{facts}</table>'
            f'<table class="nbollama-status-slots"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )
