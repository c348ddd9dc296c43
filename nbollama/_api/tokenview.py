"""A generated text as its tokens, each shaded by how likely the model found it.

``token_view_html`` is pure (no engine, no JavaScript) so the view works in a
stored notebook and in nbviewer: a colour per probability band reads faster
than floats, and hovering a token or reaching it with Tab (``tabindex=0``,
CSS ``:hover``/``:focus-within``) shows the alternatives the model weighed,
with the chosen one marked. The stylesheet is scoped under one class, so it
never restyles the notebook around it. Where a front end strips ``<style>``
(JupyterLab's untrusted outputs), the colours stay (inline) and the
alternatives stay hidden rather than spilling into the text.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from .outputs import TokenLogprob, TopLogprob, mean_logprob

__all__ = ["token_view_html", "probability_colour", "BANDS"]

_ROOT = "nbollama-tokenview"
#: Probability bands, most likely first: (lower bound, background, legend label).
#: Likely tokens stay pale, unlikely ones draw the eye (yellow -> orange -> red).
BANDS: tuple[tuple[float, str, str], ...] = (
    (0.9, "#e4edf7", "≥ 90%"),
    (0.5, "#fff0b3", "50–90%"),
    (0.2, "#ffd18c", "20–50%"),
    (0.05, "#ffab85", "5–20%"),
    (0.0, "#f28b82", "< 5%"),
)
_UNSCORED = "#eeeeee"
_MAX_GROUP = 8  # tokens gathered at most to complete one UTF-8 character
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}

_CSS = f"""
.{_ROOT}{{font-size:12px;color:var(--jp-ui-font-color1,#333);margin:2px 0;
font-family:var(--jp-ui-font-family,system-ui,sans-serif);white-space:normal}}
.{_ROOT} .nbtv-legend{{display:flex;flex-wrap:wrap;gap:4px 10px;align-items:center;margin-top:4px;
color:var(--jp-ui-font-color2,#666)}}
.{_ROOT} .nbtv-sw{{display:inline-block;padding:0 5px;border-radius:3px;color:#1a1a1a}}
.{_ROOT} .nbtv-text{{position:relative;white-space:pre-wrap;word-break:break-word;line-height:1.75;
font-family:var(--jp-code-font-family,monospace);font-size:var(--jp-code-font-size,13px)}}
.{_ROOT} .nbtv-t{{color:#1a1a1a;border-radius:2px;box-shadow:inset -1px 0 0 rgba(255,255,255,.85);
cursor:default;outline:none}}
.{_ROOT} .nbtv-t:hover,.{_ROOT} .nbtv-t:focus-within{{box-shadow:0 0 0 2px #1e88e5}}
.{_ROOT} .nbtv-p{{text-decoration:underline dotted #888}}
.{_ROOT} .nbtv-f{{font-style:italic;text-decoration:underline solid #9575cd;text-underline-offset:3px}}
.{_ROOT} .nbtv-nl::before{{content:"↵";color:#8a8a8a}}
.{_ROOT} .nbtv-tab::before{{content:"⇥";color:#8a8a8a}}
.{_ROOT} .nbtv-ctl{{color:#8a8a8a}}
.{_ROOT} .nbtv-sep{{color:var(--jp-ui-font-color2,#888);font-size:11px;padding:0 4px;user-select:none}}
.{_ROOT} .nbtv-alts{{position:absolute;left:0;z-index:20;min-width:16em;max-width:min(30em,100%);
white-space:normal;word-break:normal;line-height:1.35;font-size:12px;
font-family:var(--jp-ui-font-family,sans-serif);padding:5px 7px;border-radius:5px;
background:var(--jp-layout-color0,#fff);color:var(--jp-ui-font-color0,#222);
border:1px solid var(--jp-border-color1,#bbb);box-shadow:0 3px 10px rgba(0,0,0,.25)}}
.{_ROOT} .nbtv-t:hover>.nbtv-alts,.{_ROOT} .nbtv-t:focus-within>.nbtv-alts{{display:block!important}}
.{_ROOT} .nbtv-h{{display:block;margin-bottom:3px;color:var(--jp-ui-font-color2,#666)}}
.{_ROOT} .nbtv-alts .nbtv-r{{display:flex;gap:6px;align-items:center}}
.{_ROOT} .nbtv-alts .nbtv-r>i{{width:1em;flex:none;color:#2e7d32;font-weight:700;font-style:normal}}
.{_ROOT} .nbtv-alts .nbtv-r>code{{flex:1;min-width:4em;white-space:pre;overflow:hidden;text-overflow:ellipsis;
background:none;padding:0}}
.{_ROOT} .nbtv-alts .nbtv-r>b{{width:5em;height:7px;background:var(--jp-layout-color3,#e0e0e0);border-radius:3px;
overflow:hidden;flex:none}}
.{_ROOT} .nbtv-alts .nbtv-r>b>i{{display:block;height:100%;background:#1e88e5}}
.{_ROOT} .nbtv-alts .nbtv-r>em{{width:3.6em;text-align:right;flex:none;font-style:normal;
font-variant-numeric:tabular-nums}}
.{_ROOT} .nbtv-alts .nbtv-r>small{{flex:none;font-size:11px;font-weight:400;color:var(--jp-ui-font-color2,#777)}}
.{_ROOT} .nbtv-c{{font-weight:700}}
"""


def probability_colour(probability: float | None) -> str:
    """The background of a token with this probability (grey when it has none)."""
    if probability is None:
        return _UNSCORED
    for lower, colour, _ in BANDS:
        if probability >= lower:
            return colour
    return BANDS[-1][1]


def _percent(probability: float) -> str:
    if probability >= 0.9995:
        return "100%"
    if probability < 0.001:
        return "<0.1%"
    return f"{probability * 100:.1f}%"


def _raw(entry: TokenLogprob | TopLogprob) -> bytes:
    """A token's bytes as the model wrote them (its text when a server gave no bytes)."""
    data = entry.get("bytes")
    if data:
        return bytes(data)
    return str(entry.get("token") or "").encode("utf-8")


def _label(entry: TokenLogprob | TopLogprob) -> str:
    """A token as a label: whitespace made visible, an incomplete UTF-8 piece as its bytes."""
    data = entry.get("bytes")
    if data:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"\\x{b:02x}" if b >= 0x80 else chr(b) for b in data)
    else:
        text = str(entry.get("token") or "")
    if not text:
        return str(entry.get("token") or "")
    text = "".join(_VISIBLE.get(c, c) for c in text)
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m.group())), text)


@dataclass(frozen=True)
class _Group:
    """Consecutive tokens shown as one span: one token, or those that complete a character."""

    tokens: tuple[TokenLogprob, ...]
    text: str
    first: int  # position of the first token in its sequence


def _groups(tokens: Sequence[TokenLogprob]) -> Iterator[_Group]:
    """Tokens gathered until their bytes decode, so a character split across tokens is shown once."""
    i = 0
    while i < len(tokens):
        end = i + 1
        data = _raw(tokens[i])
        while True:
            try:
                text = data.decode("utf-8")
                break
            except UnicodeDecodeError:
                if end >= len(tokens) or end - i >= _MAX_GROUP:
                    text = data.decode("utf-8", errors="replace")
                    break
                data += _raw(tokens[end])
                end += 1
        if not text and not tokens[i].get("bytes"):
            text = str(tokens[i].get("token") or "")
        yield _Group(tuple(tokens[i:end]), text, i)
        i = end


def _text_html(text: str) -> str:
    """The token's text, escaped, as written; newlines and tabs get a mark drawn by CSS (not copied)."""
    out = []
    for piece in re.split(r"(\n|\t)", text):
        if piece == "\n":
            out.append('<span class="nbtv-nl"></span>\n')
        elif piece == "\t":
            out.append('<span class="nbtv-tab"></span>\t')
        elif piece:
            escaped = html.escape(piece)
            out.append(
                _CONTROL.sub(
                    lambda m: f'<span class="nbtv-ctl">{chr(0x2400 + ord(m.group()))}</span>',
                    escaped,
                )
            )
    return "".join(out)


def _row(label: str, probability: float, *, chosen: bool, note: str = "") -> str:
    """One alternative: a tick when chosen, the token, a bar and its percentage (kept terse:
    a view holds one row per alternative per token)."""
    width = max(0.0, min(100.0, probability * 100))
    note_html = f"<small>{html.escape(note)}</small>" if note else ""
    return (
        f'<span class="nbtv-r{" nbtv-c" if chosen else ""}"><i>{"✓" if chosen else ""}</i>'
        f"<code>{html.escape(label)}</code>{note_html}"
        f'<b><i style="width:{width:.0f}%"></i></b><em>{_percent(probability)}</em></span>'
    )


def _alternatives(token: TokenLogprob) -> str:
    """The token's top alternatives with their probabilities, the chosen one marked."""
    rows = []
    found = False
    for alt in token.get("top_logprobs") or ():
        chosen = (
            alt.get("id") == token.get("id") if "id" in token else alt["token"] == token["token"]
        )
        found = found or chosen
        rows.append(_row(_label(alt), math.exp(alt["logprob"]), chosen=chosen))
    if not found:  # sampled from outside the top K (or no alternatives were asked for)
        note = f"outside the top {len(rows)}" if rows else ""
        rows.append(_row(_label(token), math.exp(token["logprob"]), chosen=True, note=note))
    return "".join(rows)


def _forced_note(token: TokenLogprob) -> str:
    return " · forced by the format" if token.get("forced") else ""


def _popup(group: _Group, where: str, offset: int) -> str:
    tokens = group.tokens
    first = group.first + offset + 1
    total = math.fsum(t["logprob"] for t in tokens)
    if len(tokens) == 1:
        token = tokens[0]
        head = (
            f"{where} token {first} · {_percent(math.exp(total))} · "
            f"logprob {total:.3f} · id {token.get('id', '?')}{_forced_note(token)}"
        )
        body = _alternatives(token)
    else:
        head = (
            f"{where} tokens {first}–{first + len(tokens) - 1}: "
            f"{len(tokens)} tokens make this text · together {_percent(math.exp(total))}"
        )
        body = "".join(
            f'<span class="nbtv-h">token {first + k} · '
            f"{_percent(math.exp(t['logprob']))}{_forced_note(t)}</span>{_alternatives(t)}"
            for k, t in enumerate(tokens)
        )
    return (
        f'<span class="nbtv-alts" role="tooltip" style="display:none">'
        f'<span class="nbtv-h">{html.escape(head)}</span>{body}</span>'
    )


def _spans(tokens: Sequence[TokenLogprob], where: str, *, offset: int = 0, extra: str = "") -> str:
    """One span per group; ``offset``: the position of ``tokens[0]`` in its sequence."""
    out = []
    for group in _groups(tokens):
        probability = math.exp(math.fsum(t["logprob"] for t in group.tokens))
        forced = all(t.get("forced") for t in group.tokens)  # taken without sampling: italic
        out.append(
            f'<span class="nbtv-t{extra}{" nbtv-f" if forced else ""}" tabindex="0" '
            f'style="background:{probability_colour(probability)}{";font-style:italic" if forced else ""}">'
            f"{_text_html(group.text)}{_popup(group, where, offset)}</span>"
        )
    return "".join(out)


def _prompt_spans(prompt: Sequence[TokenLogprob | None]) -> str:
    """The prompt's tokens; a token with no score (the first: nothing before it) is grey."""
    out = []
    start = 0
    for i, entry in enumerate([*prompt, None]):
        if entry is not None:
            continue
        run = cast("list[TokenLogprob]", list(prompt[start:i]))
        out.append(_spans(run, "prompt", offset=start, extra=" nbtv-p"))
        start = i + 1
        if i < len(prompt):
            out.append(
                f'<span class="nbtv-t nbtv-p" tabindex="0" style="background:{_UNSCORED}">…'
                '<span class="nbtv-alts" role="tooltip" style="display:none">'
                f'<span class="nbtv-h">prompt token {i + 1}: nothing before it to predict it from'
                "</span></span></span>"
            )
    return "".join(out)


def _perplexity(tokens: Sequence[TokenLogprob]) -> str:
    mean = mean_logprob(tokens)
    if mean is None:
        return ""
    return f"mean logprob {mean:.3f} · perplexity {math.exp(-mean):.2f}"


def _legend(
    logprobs: Sequence[TokenLogprob], prompt: Sequence[TokenLogprob] | None, *, summary: bool
) -> str:
    swatches = "".join(
        f'<span class="nbtv-sw" style="background:{colour}">{html.escape(label)}</span>'
        for _, colour, label in BANDS
    )
    forced = sum(1 for t in logprobs if t.get("forced"))
    facts = f"output: {len(logprobs)} tokens" + (f" ({forced} forced)" if forced else "")
    facts += f" · {_perplexity(logprobs)}" if logprobs else ""
    if prompt:
        facts += f"; prompt: {len(prompt)} scored tokens · {_perplexity(prompt)}"
    forced_key = (
        '<span><span class="nbtv-f" style="font-style:italic">italic</span>: forced by the format, '
        "not sampled</span>"
        if forced
        else ""
    )
    return (
        f'<div class="nbtv-legend"><span>probability (before temperature):</span>{swatches}'
        f"<span>hover or Tab to a token for its alternatives</span>{forced_key}</div>"
        + (f'<div class="nbtv-legend">{html.escape(facts)}</div>' if summary else "")
    )


def token_view_html(
    logprobs: Sequence[TokenLogprob],
    *,
    prompt_logprobs: Sequence[TokenLogprob | None] | None = None,
    summary: bool = True,
) -> str:
    """The tokens of an output (after its prompt's, when given) as shaded spans with their alternatives.

    ``logprobs`` are ``Result.logprobs``; ``prompt_logprobs`` are
    ``Result.prompt_logprobs`` (None for an unscored token); ``summary=False`` leaves out
    the line of counts and perplexities (a card shows them already). Text is escaped
    and shown as written, newlines and tabs marked; consecutive tokens that
    only together make a UTF-8 character are one span.
    """
    scored_prompt = [t for t in prompt_logprobs or () if t is not None]
    body = ""
    if prompt_logprobs:
        body = (
            _prompt_spans(prompt_logprobs)
            + '<span class="nbtv-sep" title="the output starts here">▸</span>'
        )
    body += _spans(logprobs, "output")
    rows = max((_popup_rows(g) for g in _groups([*scored_prompt, *logprobs])), default=1)
    legend = _LEGEND_PX if summary else _LEGEND_PX / 2
    room = max(0, round(_ROW_PX * min(rows, _MAX_ROOM_ROWS) + _POPUP_PX - legend))
    return (
        f'<div class="{_ROOT}" style="padding-bottom:{room}px"><style>{_CSS}</style>'
        f'<div class="nbtv-text">{body}</div>'
        f"{_legend(logprobs, scored_prompt if prompt_logprobs else None, summary=summary)}</div>"
    )


# The legend sits under the text, and a popup opens over it; the view keeps room below for the
# rest of the tallest popup, so one on the last line is not cut off by a scrolling output area.
_ROW_PX = 16.5
_POPUP_PX = 36  # a popup's header, padding and border
_LEGEND_PX = 44  # the legend's two lines (one without the summary)
_MAX_ROOM_ROWS = 12


def _popup_rows(group: _Group) -> int:
    """Lines of the group's popup (its header, each token's alternatives and the chosen one)."""
    rows = 0 if len(group.tokens) == 1 else len(group.tokens)
    for token in group.tokens:
        top = token.get("top_logprobs") or ()
        chosen_in_top = any(alt.get("id") == token.get("id") for alt in top)
        rows += len(top) + (0 if chosen_in_top else 1)
    return rows
