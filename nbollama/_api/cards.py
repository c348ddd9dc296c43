"""A request's card: the prompt, its state, the answer (choice bars, tokens, parsed output), its figures.

One renderer for every place a request shows: each prompt's area in a
``%%generate`` cell, and a ``Result`` a cell returns (``Result._repr_html_``).
Plain HTML (no JavaScript), so it stays in a saved notebook. Pure functions of
the view; this layer is below ``requests``, so a ``Result`` is read by its
attributes, not imported.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._palette import badge_html
from .tokenview import token_view_html

__all__ = [
    "CardView",
    "short",
    "preview",
    "figures_of",
    "final_view",
    "head_text",
    "card_html",
    "cards_html",
    "extras_text",
    "plain_text",
    "fields_of",
    "shorten",
]

_PREVIEW_CHARS = 60
_TITLE_CHARS = 2000
#: How a request ended, as a card's badge says it (the snapshot's BADGE_FOR_REASON, at this layer).
_BADGE = {"stop": "done", "length": "done", "cancelled": "cancelled", "error": "error"}


def short(text: str, limit: int, elide: int = 0) -> str:
    """One line of at most ``limit`` characters; ``elide`` leading characters shown as "…"."""
    folded = " ".join(text[elide:].split())
    if elide:
        folded = "…" + folded
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"


@dataclass
class CardView:
    """What one prompt's area shows at a moment."""

    number: int
    prompt: str
    status: str
    slot: int | None
    text: str
    figures: str
    error: str | None = None
    elide: int = 0  # leading prompt characters every prompt of the cell shares
    result: Any = None  # once finished, its Result: its choice, parsed output and logprobs


def figures_of(result: Any) -> str:
    """The card's last line: tokens, TTFT, tokens/s, queueing, perplexities, how it ended."""
    n = result.completion_tokens
    forced = f" ({result.forced_tokens} forced)" if result.forced_tokens else ""  # jump-forward
    parts = [f"{n} token{'' if n == 1 else 's'}{forced}"]
    if result.cached:  # the original run's timings would read as this run's: say where it came from
        return " · ".join([*parts, "replayed from the result store", result.finish_reason])
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


def final_view(number: int, result: Any, elide: int = 0) -> CardView:
    """A finished request's card (``result``: a ``Result``; typed loosely, this layer is below it)."""
    return CardView(
        number=number,
        prompt=result.prompt,
        status="cached" if result.cached else _BADGE[result.finish_reason],
        slot=result.slot,
        text=result.text,
        figures=figures_of(result),
        error=result.error if result.finish_reason == "error" else None,
        elide=elide,
        result=result,
    )


def preview(prompt: str, elide: int = 0) -> str:
    return short(prompt, _PREVIEW_CHARS, elide)


def head_text(view: CardView) -> str:
    slot = "–" if view.slot is None else str(view.slot)
    return f"#{view.number} [{view.status} · slot {slot}] {preview(view.prompt, view.elide)}"


def card_html(view: CardView) -> str:
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
        f"{html.escape(preview(view.prompt, view.elide))}</span></div>"
        f"{answer_html(view)}"
        '<div class="nbollama-figures" style="font-size:11px;color:var(--jp-ui-font-color2,#777)">'
        f"{html.escape(view.figures)}</div>{error}</div>"
    )


def answer_html(view: CardView) -> str:
    """The card's middle: the choice's bars, the text (as its tokens when logprobs were asked),
    the parsed output."""
    result = view.result
    parts = []
    if result is not None and result.choice is not None:
        parts.append(choice_html(result))
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
        parts.append(parsed_html(result))
    return "".join(parts)


def _same(text: str, choice: str) -> bool:
    return not text.strip() or text.strip() == choice.strip()


def choice_html(result: Any) -> str:
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


def fields_of(parsed: Any) -> Mapping[str, Any] | None:
    if isinstance(parsed, Mapping):
        return parsed
    dump = getattr(parsed, "model_dump", None)
    value = dump() if callable(dump) else None
    return value if isinstance(value, Mapping) else None


def parsed_html(result: Any) -> str:
    """A format's outcome: the parsed output's top-level fields, or why it did not parse."""
    if result.parse_error is not None:
        return (
            '<div class="nbollama-parsed" style="color:#c62828;font-size:12px;margin:2px 0">'
            f"not parsed: {html.escape(result.parse_error)}</div>"
        )
    parsed = result.parsed
    if parsed is None or isinstance(parsed, str):
        return ""  # no format asked, or a regex/grammar: the text above is the output
    fields = fields_of(parsed)
    kind = "dict" if isinstance(parsed, Mapping) else type(parsed).__name__
    if fields is None:
        rows = f'<code style="white-space:pre-wrap">{html.escape(shorten(parsed))}</code>'
    else:
        rows = "".join(
            f'<span style="color:var(--jp-ui-font-color2,#666)">{html.escape(str(k))}</span>'
            f'<code style="white-space:pre-wrap;word-break:break-word;background:none">'
            f"{html.escape(shorten(v))}</code>"
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


def shorten(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _FIELD_CHARS else text[: _FIELD_CHARS - 1] + "…"


def cards_html(views: Sequence[CardView]) -> str:
    columns = "1fr" if len(views) == 1 else "repeat(auto-fill,minmax(280px,1fr))"
    cards = "".join(card_html(v) for v in views)
    return f'<div class="nbollama-generate" style="display:grid;grid-template-columns:{columns};gap:8px">{cards}</div>'


def extras_text(view: CardView) -> list[str]:
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
        fields = fields_of(result.parsed)
        lines.append(f"parsed: {shorten(result.parsed if fields is None else dict(fields))}")
    return lines


def plain_text(views: Sequence[CardView]) -> str:
    blocks = []
    for v in views:
        block = "\n".join([head_text(v), *extras_text(v), v.text, f"({v.figures})"])
        if v.error:
            block += f"\nerror: {v.error}"
        blocks.append(block)
    return "\n\n".join(blocks)
