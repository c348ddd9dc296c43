"""One palette for the kernel-side views of a slot or request: %%generate cells and the dashboard.

Its colours, and the one coloured "pill" that shows a badge (``badge_html``).
The JupyterLab panel colours its badges with the theme's own variables instead.
This is the bottom layer: it imports nothing from nbollama.
"""

from __future__ import annotations

import html
from typing import Literal, TypeAlias

__all__ = ["BADGE_COLOURS", "STATUS_COLOURS", "BadgeStyle", "badge_html"]

#: Grey while waiting or idle, amber while reading the prompt, blue while
#: generating, then briefly how the request ended.
BADGE_COLOURS: dict[str, str] = {
    "queued": "#9e9e9e",
    "idle": "#9e9e9e",
    "sent": "#78909c",  # a remote server has it, no token yet
    "prefill": "#f0a202",
    "generating": "#1e88e5",
    "done": "#2e7d32",
    "cancelled": "#8d6e63",
    "error": "#c62828",
    "cached": "#00897b",  # replayed from the result store
}

#: A live view's own status (the dashboard's header), not a slot's.
STATUS_COLOURS: dict[str, str] = {
    "live": "#2e7d32",
    "engine closed": "#c62828",
    "no engine": "#9e9e9e",
    "stopped": "#757575",
    "closed": "#9e9e9e",
}

_GREY = "#9e9e9e"  # a badge of no known colour

#: ``"block"``: a slot row's fixed-width pill, with a class per badge (``nbollama-badge-idle``);
#: ``"inline"``: a compact pill in a line or a table cell (cards, progress view, status);
#: ``"outline"``: an outlined one, for a view's own status.
BadgeStyle: TypeAlias = Literal["block", "inline", "outline"]

_LOOKS: dict[str, tuple[str, str]] = {  # style -> (class attribute, CSS, {c} the colour)
    "block": (
        ' class="nbollama-badge nbollama-badge-{badge}"',
        "display:inline-block;min-width:6.5em;text-align:center;padding:1px 6px;"
        "border-radius:9px;background:{c};color:white;font-size:11px;font-weight:600",
    ),
    "inline": (
        ' class="nbollama-badge"',
        "background:{c};color:#fff;border-radius:8px;padding:0 6px",
    ),
    "outline": (
        "",
        "padding:0 6px;border-radius:8px;border:1px solid {c};color:{c};font-size:11px",
    ),
}


def badge_html(badge: str, *, style: BadgeStyle = "block") -> str:
    """A coloured pill with the badge's name (escaped); unknown badges are grey.

    ``badge`` is a slot or request state (``BADGE_COLOURS``) or a view's status
    (``STATUS_COLOURS``).
    """
    colour = BADGE_COLOURS.get(badge) or STATUS_COLOURS.get(badge, _GREY)
    name = html.escape(badge)
    classes, css = _LOOKS[style]
    return f'<span{classes.format(badge=name)} style="{css.format(c=colour)}">{name}</span>'
