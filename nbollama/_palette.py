"""One palette for the kernel-side views of a slot or request: %%generate cells and the dashboard.

The JupyterLab panel colours its badges with the theme's own variables instead.
"""

from __future__ import annotations

__all__ = ["BADGE_COLOURS"]

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
}
