"""The wire between an engine and a widget: ``EngineLink`` (one subscription, one lock, the
session followed; shared with the side panel's comm) and the helpers every widget uses.

Snapshots arrive on the engine's monitor thread. ipywidgets sends a trait
change through the kernel's IOPub thread from whichever thread makes it, so
views update in place from there; the link's lock only keeps one view's
updates from interleaving (a snapshot on the monitor thread against an
engine swap or a ``close()`` on the kernel's thread).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import ipywidgets as widgets

from .._api.protocol import EngineLike
from .._link import EngineLink

if TYPE_CHECKING:
    from .._api.snapshot import EngineSnapshot

__all__ = [
    "LiveView",
    "EngineLink",
    "DEFAULT_INTERVAL",
    "close_tree",
    "close_children",
    "imports_in_progress",
]

#: Seconds between view updates at most (4 Hz): enough to watch tokens flow,
#: cheap enough that the engine does not notice.
DEFAULT_INTERVAL = 0.25


class LiveView:
    """Mixin for a widget that can follow an engine on its own (``reset``/``update`` from a LiveLink).

    Put it before the ipywidgets base class; ``close()`` stops the updates,
    then closes the children and the widget itself.
    """

    _link: EngineLink | None = None

    if TYPE_CHECKING:  # what the widget class mixing this in defines

        def reset(self, engine: EngineLike | None) -> None: ...

        def update(self, snapshot: EngineSnapshot | None) -> None: ...

    def _follow(self, engine: EngineLike | None, interval: float) -> None:
        if engine is not None:
            self._link = EngineLink(self.reset, self.update, interval=interval)
            self._link.attach(engine)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        close_children(self)
        super().close()  # type: ignore[misc]  # a mixin: close() is the widget base's, after it


def close_children(widget: widgets.Widget) -> None:
    """Close a container's children and its own layout/style models, not the container itself."""
    for child in getattr(widget, "children", ()) or ():
        close_tree(child)
    for name in ("layout", "style"):
        part = getattr(widget, name, None)
        if isinstance(part, widgets.Widget):
            part.close()


def close_tree(widget: widgets.Widget) -> None:
    """Close a widget and everything under it: each child, layout and style is a comm of its own."""
    close_children(widget)
    widget.close()


def imports_in_progress() -> bool:
    """True while any thread is half-way through importing a module.

    plotly looks ``pandas`` and ``numpy`` up in ``sys.modules`` and uses what
    it finds; a redraw from the monitor thread while the user's cell is
    importing pandas met a half-initialised module (``AttributeError: partially
    initialized module 'pandas' has no attribute 'Series'``). Redraws wait for
    the import to finish instead.
    """
    for module in list(sys.modules.values()):
        spec = getattr(module, "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            return True
    return False
