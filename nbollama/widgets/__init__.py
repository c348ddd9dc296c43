"""Live views of an engine for notebooks: slot monitor, memory panel, throughput chart, dashboard.

``dashboard()`` is what ``%nbollama dashboard`` and ``%%generate --watch``
show; the parts are usable on their own (``SlotMonitor(engine)`` etc.).
All of them update from ``Engine.subscribe`` on the engine's monitor thread,
at most 4 times a second and only when something changed.
"""

from __future__ import annotations

from ._chart import ThroughputChart
from ._dashboard import Dashboard, dashboard
from ._memory import MemoryPanel, memory_html, memory_summary
from ._slots import BADGE_COLOURS, SlotMonitor, SlotRow, badge_html

__all__ = [
    "dashboard",
    "Dashboard",
    "SlotMonitor",
    "SlotRow",
    "MemoryPanel",
    "ThroughputChart",
    "BADGE_COLOURS",
    "badge_html",
    "memory_html",
    "memory_summary",
]
