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

from .._api.protocol import EngineLike
from .._api.snapshot import EngineSnapshot, SlotSnapshot
from .._palette import BADGE_COLOURS, badge_html
from ._live import DEFAULT_INTERVAL, LiveView, close_tree

__all__ = ["BADGE_COLOURS", "SlotRow", "SlotMonitor", "badge_html"]

BADGE_HISTORY = 200

_BAR_STYLES: dict[str, str] = {
    "idle": "",
    "sent": "",
    "prefill": "warning",
    "generating": "info",
    "done": "success",
    "cancelled": "warning",
    "error": "danger",
}


def _cache_tag(cached: int) -> str:
    """A small mark for a prefix-cache hit: the prompt tokens that were not computed again."""
    return (
        f'<span class="nbollama-cache-hit" title="{cached} prompt tokens reused from the prefix cache" '
        'style="display:inline-block;margin-right:4px;padding:0 4px;border-radius:6px;background:#e8f5e9;'
        f'color:#2e7d32;font-size:11px;line-height:1.5">cache {cached}</span>'
    )


class SlotRow(widgets.HBox):
    """One slot: badge, prompt preview, decoded/max tokens as a bar with tokens/s beside it.

    On a remote engine a figure the server does not give is None and shown as
    "?"; a slot serving another client of the server says so.
    """

    slot_id = Int(0)
    state = Unicode("idle")
    badge = Unicode("idle")
    request_id = Int(None, allow_none=True)
    prompt_preview = Unicode("")
    prompt_tokens = Int(0, allow_none=True)
    prefilled_tokens = Int(0, allow_none=True)
    #: prompt tokens the request took from the prefix cache instead of computing them
    cached_tokens = Int(0)
    decoded_tokens = Int(0)
    max_tokens = Int(0, allow_none=True)
    tps = Float(0.0, allow_none=True)
    kv_used = Int(0, allow_none=True)
    #: "this kernel" or "another client" (a shared server's slots)
    origin = Unicode("this kernel")
    #: what the row stands for: "slot" (an engine's or a server's slot) or "lane" (a request in flight)
    label = Unicode("slot")
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
        # flex-basis 0 and overflow hidden: a long prompt is cut with an ellipsis inside its own
        # box instead of widening it over the figures beside it
        self._preview = widgets.HTML(
            self._preview_html(""),
            layout=widgets.Layout(flex="1 1 0%", width="auto", min_width="8em", overflow="hidden"),
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
    def _preview_html(
        preview: str, origin: str = "this kernel", busy: bool = False, tag: str = ""
    ) -> str:
        text = html.escape(preview) if preview else '<span style="color:#9e9e9e">-</span>'
        title = html.escape(preview)
        if origin == "another client" and busy:
            tag = '<span class="nbollama-origin" style="color:#6a1b9a;font-style:italic">another client</span>'
            text = f"{tag} {html.escape(preview)}" if preview else tag
            title = "a request from another client of this server" + (f": {title}" if preview else "")
        # width 0 / min-width 100%: the line takes its box's width, not its text's, so a long
        # prompt ends in an ellipsis instead of running under the figures beside it
        return (
            f'<div title="{title}" style="white-space:nowrap;overflow:hidden;text-overflow:ellipsis;'
            f'width:0;min-width:100%;font-size:12px">{tag}{text}</div>'
        )

    def _stats_text(self) -> str:
        def known(value: object) -> str:
            return "?" if value is None else str(value)

        if self.state == "prefill":
            return f"prompt {known(self.prefilled_tokens)}/{known(self.prompt_tokens)} tok"
        if self.state == "sent":
            return f"sent · {self.decoded_tokens}/{known(self.max_tokens)} tok"
        if self.max_tokens == 0 or (self.max_tokens is None and self.state == "idle"):
            return ""
        if self.state == "generating":
            rate = "? tok/s" if self.tps is None else f"{self.tps:.1f} tok/s"
            return f"{self.decoded_tokens}/{known(self.max_tokens)} tok · {rate}"
        return f"{self.decoded_tokens}/{known(self.max_tokens)} tok"

    def set_label(self, label: str) -> None:
        if label != self.label:
            self.label = label
            self._name.value = f'<span style="font-family:monospace">{html.escape(label)} {self.slot_id}</span>'

    def update(self, slot: SlotSnapshot) -> None:
        """Show one slot's snapshot; only what changed goes to the frontend."""
        self.state = slot["state"]
        self.badge = slot["badge"]
        self.request_id = slot["request_id"]
        self.prompt_preview = slot["prompt_preview"]
        self.prompt_tokens = slot["prompt_tokens"]
        self.prefilled_tokens = slot["prefilled_tokens"]
        self.cached_tokens = slot.get("cached_tokens") or 0
        self.decoded_tokens = slot["decoded_tokens"]
        self.max_tokens = slot["max_tokens"]
        self.tps = slot["tps"]
        self.kv_used = slot["kv_used"]
        self.origin = slot.get("origin", "this kernel")
        if self.badges_seen[-1] != slot["badge"]:
            self.badges_seen = [*self.badges_seen[-(BADGE_HISTORY - 1) :], slot["badge"]]
        self._badge.value = badge_html(slot["badge"])
        hit = self.cached_tokens and slot["badge"] != "idle"
        self._preview.value = self._preview_html(
            slot["prompt_preview"],
            self.origin,
            slot["state"] != "idle",
            tag=_cache_tag(self.cached_tokens) if hit else "",
        )
        with self._progress.hold_sync():
            limit = slot["max_tokens"] or slot["decoded_tokens"]  # no limit known: a full bar
            self._progress.max = max(1, limit)  # before value, which max caps
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
    #: a remote engine's server-side line ("server: 2 running, 1 waiting"); "" for the local engine
    server_line = Unicode("")

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
        remote = snapshot.get("remote")
        label = "lane" if remote is not None and remote["rows"] == "requests in flight" else "slot"
        for row, slot in zip(self.rows, snapshot["slots"]):
            row.set_label(label)
            row.update(slot)
        self.server_line = _server_line(remote) if remote is not None else ""
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
        server = f" · {html.escape(self.server_line)}" if self.server_line else ""
        return (
            f'<div style="font-size:12px">{state}<b>{self.busy_slots}/{self.parallel}</b> slots busy · '
            f"queue <b>{self.queue_length}</b>/{self.queue_max} · "
            f"requests {self.submitted} submitted, {self.completed} done, "
            f"{self.cancelled} cancelled, {self.errors} errors · "
            f"{self.generated_tokens} tokens generated{server}</div>"
        )


def _server_line(remote: Any) -> str:
    """What a remote engine's server says of its load, with unknowns said so."""

    def known(value: object) -> str:
        return "?" if value is None else str(value)

    if not remote["reachable"]:
        return f"server unreachable: {remote['error']}"
    line = (
        f"this kernel: {remote['in_flight']}/{remote['max_inflight']} in flight · "
        f"server: {known(remote['server_running'])} running, {known(remote['server_waiting'])} waiting"
    )
    if remote["server_throughput"] is not None:
        line += f", {remote['server_throughput']:.1f} tok/s"
    return line

