"""The slot monitor: one row per slot, so continuous batching is something you can see.

Built from stock ipywidgets (HTML, IntProgress, HBox/VBox) so it renders in
any frontend that renders widgets, with no extension of its own. Each row
keeps its figures as traitlets, which is what tests (and curious users)
read; only the child widgets talk to the frontend.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
from traitlets import Bool, Float, Int, List, Unicode

from .._core._protocol import EngineLike
from .._core._snapshot import EngineSnapshot, SlotSnapshot
from .._palette import BADGE_COLOURS
from ._live import DEFAULT_INTERVAL, LiveView, close_tree

__all__ = ["BADGE_COLOURS", "SlotRow", "SlotMonitor", "badge_html"]

BADGE_HISTORY = 200

_BAR_STYLES: dict[str, str] = {
    "idle": "",
    "prefill": "warning",
    "generating": "info",
    "done": "success",
    "cancelled": "warning",
    "error": "danger",
}


def badge_html(badge: str) -> str:
    """A coloured pill with the badge's name; unknown badges are grey."""
    colour = BADGE_COLOURS.get(badge, "#9e9e9e")
    return (
        f'<span class="nbollama-badge nbollama-badge-{html.escape(badge)}" '
        f'style="display:inline-block;min-width:6.5em;text-align:center;padding:1px 6px;'
        f'border-radius:9px;background:{colour};color:white;font-size:11px;font-weight:600">'
        f"{html.escape(badge)}</span>"
    )


class SlotRow(widgets.HBox):
    """One slot: badge, prompt preview, decoded/max tokens as a bar with tokens/s beside it."""

    slot_id = Int(0)
    state = Unicode("idle")
    badge = Unicode("idle")
    request_id = Int(None, allow_none=True)
    prompt_preview = Unicode("")
    prompt_tokens = Int(0)
    prefilled_tokens = Int(0)
    decoded_tokens = Int(0)
    max_tokens = Int(0)
    tps = Float(0.0)
    kv_used = Int(0)
    #: The badges this row has shown, in order, repeats folded (a slot's life
    #: story); the last ``BADGE_HISTORY`` of them.
    badges_seen = List(Unicode())

    def __init__(self, slot_id: int, **kwargs: Any) -> None:
        self._name = widgets.HTML(
            f'<span style="font-family:monospace">slot {slot_id}</span>',
            layout=widgets.Layout(width="4.5em", flex="0 0 auto"),
        )
        self._badge = widgets.HTML(
            badge_html("idle"), layout=widgets.Layout(width="8em", flex="0 0 auto")
        )
        self._preview = widgets.HTML(
            self._preview_html(""),
            layout=widgets.Layout(flex="1 1 auto", width="auto", min_width="8em"),
        )
        # the figures ride on the bar's description: one message per row per update
        self._progress = widgets.IntProgress(
            value=0,
            min=0,
            max=1,
            description="",
            style={"description_width": "13em"},
            layout=widgets.Layout(width="23em", flex="0 0 auto"),
        )

        super().__init__(
            [self._name, self._badge, self._preview, self._progress],
            layout=widgets.Layout(align_items="center", width="100%"),
            **kwargs,
        )
        self.slot_id = slot_id
        self.badges_seen = ["idle"]
        self.add_class("nbollama-slot-row")

    @staticmethod
    def _preview_html(preview: str) -> str:
        text = html.escape(preview) if preview else '<span style="color:#9e9e9e">-</span>'
        return (
            f'<div title="{html.escape(preview)}" style="white-space:nowrap;overflow:hidden;'
            f'text-overflow:ellipsis;font-size:12px">{text}</div>'
        )

    def _stats_text(self) -> str:
        if self.state == "prefill":
            return f"prompt {self.prefilled_tokens}/{self.prompt_tokens} tok"
        if not self.max_tokens:
            return ""
        if self.state == "generating":
            return f"{self.decoded_tokens}/{self.max_tokens} tok · {self.tps:.1f} tok/s"
        return f"{self.decoded_tokens}/{self.max_tokens} tok"

    def update(self, slot: SlotSnapshot) -> None:
        """Show one slot's snapshot; only what changed goes to the frontend."""
        self.state = slot["state"]
        self.badge = slot["badge"]
        self.request_id = slot["request_id"]
        self.prompt_preview = slot["prompt_preview"]
        self.prompt_tokens = slot["prompt_tokens"]
        self.prefilled_tokens = slot["prefilled_tokens"]
        self.decoded_tokens = slot["decoded_tokens"]
        self.max_tokens = slot["max_tokens"]
        self.tps = slot["tps"]
        self.kv_used = slot["kv_used"]
        if self.badges_seen[-1] != slot["badge"]:
            self.badges_seen = [*self.badges_seen[-(BADGE_HISTORY - 1) :], slot["badge"]]
        self._badge.value = badge_html(slot["badge"])
        self._preview.value = self._preview_html(slot["prompt_preview"])
        with self._progress.hold_sync():
            self._progress.max = max(1, slot["max_tokens"])  # before value, which max caps
            self._progress.value = min(slot["decoded_tokens"], self._progress.max)
            self._progress.bar_style = _BAR_STYLES.get(slot["badge"], "")
            self._progress.description = self._stats_text()


class SlotMonitor(LiveView, widgets.VBox):
    """Every slot of the engine, the queue behind them, and the request counts so far.

    Give it an ``engine`` to watch on its own; the dashboard instead feeds it
    through ``update(snapshot)``. ``summary=False`` leaves out the line of
    counts above the rows (the compact dashboard has its own).
    """

    snapshot_seq = Int(-1)
    parallel = Int(0)
    busy_slots = Int(0)
    queue_length = Int(0)
    queue_max = Int(0)
    submitted = Int(0)
    completed = Int(0)
    cancelled = Int(0)
    errors = Int(0)
    generated_tokens = Int(0)
    throughput = Float(0.0)
    engine_closed = Bool(False)

    def __init__(
        self,
        engine: EngineLike | None = None,
        *,
        summary: bool = True,
        interval: float = DEFAULT_INTERVAL,
        **kwargs: Any,
    ) -> None:
        self._summary = widgets.HTML(self._summary_html())
        self._rows_box = widgets.VBox(layout=widgets.Layout(width="100%"))
        self.rows: list[SlotRow] = []
        parts = [self._summary, self._rows_box] if summary else [self._rows_box]
        kwargs.setdefault("layout", widgets.Layout(width="100%"))
        super().__init__(parts, **kwargs)
        self.add_class("nbollama-slot-monitor")
        self._follow(engine, interval)

    def reset(self, engine: EngineLike | None) -> None:
        """Forget the previous engine: one fresh row per slot of ``engine``."""
        self.set_rows(engine.parallel if engine is not None else 0)
        self.snapshot_seq = -1
        self.engine_closed = False
        self.busy_slots = self.queue_length = self.queue_max = 0
        self.submitted = self.completed = self.cancelled = self.errors = self.generated_tokens = 0
        self.throughput = 0.0
        self._summary.value = self._summary_html()

    def set_rows(self, n: int) -> None:
        if n == len(self.rows):
            return
        old = self.rows
        self.rows = [SlotRow(i) for i in range(n)]
        self.parallel = n
        self._rows_box.children = tuple(self.rows)
        for row in old:
            close_tree(row)

    def update(self, snapshot: EngineSnapshot | None) -> None:
        """Show a snapshot; None (or ``closed``) marks the engine as closed and keeps the last figures."""
        if snapshot is None or snapshot["closed"]:
            self.engine_closed = True
            self.busy_slots = 0
            self.queue_length = 0
            if snapshot is None:
                self._summary.value = self._summary_html()
                return
        self.set_rows(len(snapshot["slots"]))
        for row, slot in zip(self.rows, snapshot["slots"]):
            row.update(slot)
        totals = snapshot["totals"]
        if not snapshot["closed"]:
            self.busy_slots = snapshot["busy_slots"]
            self.queue_length = snapshot["queue"]["length"]
        self.queue_max = snapshot["queue"]["max"]
        self.submitted = totals["submitted"]
        self.completed = totals["completed"]
        self.cancelled = totals["cancelled"]
        self.errors = totals["errors"]
        self.generated_tokens = totals["generated_tokens"]
        self.throughput = snapshot["throughput"]
        self.snapshot_seq = snapshot["seq"]
        self._summary.value = self._summary_html()

    def _summary_html(self) -> str:
        if self.engine_closed:
            state = '<b style="color:#c62828">engine closed</b> · '
        else:
            state = ""
        return (
            f'<div style="font-size:12px">{state}<b>{self.busy_slots}/{self.parallel}</b> slots busy · '
            f"queue <b>{self.queue_length}</b>/{self.queue_max} · "
            f"requests {self.submitted} submitted, {self.completed} done, "
            f"{self.cancelled} cancelled, {self.errors} errors · "
            f"{self.generated_tokens} tokens generated</div>"
        )

