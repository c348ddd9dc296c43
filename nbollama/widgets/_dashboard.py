"""The dashboard: what was loaded, the slots, throughput and memory, live in one output cell.

One subscription feeds every part, so two views cost one snapshot, not two.
``%nbollama dashboard`` shows the full one; ``%%generate --watch`` the compact
one (slot rows and a one-line summary, no chart).
"""

from __future__ import annotations

import html
import time
from typing import Any

import ipywidgets as widgets
from traitlets import Bool, Int, Unicode

from .. import session
from .._api.protocol import EngineLike
from .._api.snapshot import EngineSnapshot
from .._palette import badge_html
from ._chart import ThroughputChart
from ._live import DEFAULT_INTERVAL, EngineLink, close_children
from ._memory import MemoryPanel, memory_summary
from ._slots import SlotMonitor

__all__ = ["Dashboard", "dashboard"]

#: Seconds between redraws of the chart and the memory panel while the engine
#: is busy (slot rows follow every snapshot); an idle or closed engine's
#: snapshot is always drawn, so the last state shown is the real one.
SLOW_PARTS_INTERVAL = 1.0

_HINT = (
    '<div class="nbollama-hint" style="padding:6px 8px;border-left:3px solid #f0a202;background:#fff8e1;'
    'font-size:12px">No engine is loaded. Run <code>%nbollama load</code> (or <code>nbollama.load()</code>); '
    "this dashboard picks it up as soon as it is there.</div>"
)


def _gone_hint(model: str) -> str:
    """The header once the kernel's engine was unloaded: what is shown is the last engine's."""
    return (
        '<div class="nbollama-hint" style="padding:6px 8px;border-left:3px solid #9e9e9e;background:#f5f5f5;'
        f'font-size:12px">No engine is loaded now. Below: the last one\'s figures (<b>{html.escape(model)}</b>), '
        "as it left them. Run <code>%nbollama load</code> (or <code>nbollama.load()</code>) and this "
        "dashboard shows the new engine.</div>"
    )


class Dashboard(widgets.VBox):
    """Header, slot monitor, throughput chart and memory panel of one engine, updated live.

    Made with no engine, it follows the kernel's engine (``%nbollama load``
    swaps it in). ``stop()`` freezes it on its last state, ``close()`` also
    removes its widgets; any number of dashboards can watch one engine.
    """

    compact = Bool(False)
    #: "live", "engine closed", "no engine"; "stopped" or "closed" after ``stop()`` / ``close()``
    status = Unicode("no engine")
    following_session = Bool(False)
    #: the engine picked in the selector ("" while following the kernel's default)
    pinned = Unicode("")
    model_name = Unicode("")
    parallel = Int(0)
    ctx_per_slot = Int(0, allow_none=True)  # None: a remote server that does not say
    n_batch = Int(0, allow_none=True)
    gpu_layers = Int(0, allow_none=True)
    parallel_reason = Unicode("")
    #: "local", or the kind of server ("llama-server", "ollama", "vllm", "openai")
    kind = Unicode("local")
    #: a remote engine's URL (credentials redacted), "" for the local engine
    endpoint = Unicode("")
    snapshot_seq = Int(-1)
    #: snapshots shown so far (the first render included)
    updates = Int(0)

    def __init__(
        self,
        engine: EngineLike | None = None,
        *,
        compact: bool = False,
        follow_session: bool | None = None,
        interval: float = DEFAULT_INTERVAL,
        **kwargs: Any,
    ) -> None:
        self._header = widgets.HTML(_HINT)
        # several engines in the kernel: which one this dashboard shows (hidden with one)
        self.selector = widgets.Dropdown(
            options=[], description="engine", layout=widgets.Layout(display="none", width="auto")
        )
        self._filling = False
        self.selector.observe(self._on_select, names="value")
        # picked in the selector: pinned to that engine, with the way back to the default
        self._pin_note = widgets.HTML("", layout=widgets.Layout(margin="0 0 0 8px"))
        self.follow_button = widgets.Button(
            description="follow the default",
            tooltip="Show the kernel's default engine again, and follow %nbollama use",
            layout=widgets.Layout(width="auto"),
        )
        self.follow_button.add_class("nbollama-follow-default")
        self.follow_button.on_click(lambda _button: self.follow_default())
        self._engine_bar = widgets.HBox(
            [self.selector, self._pin_note, self.follow_button],
            layout=widgets.Layout(display="none", align_items="center"),
        )
        self._engine_bar.add_class("nbollama-engine-bar")
        self.slots = SlotMonitor(summary=not compact)
        self.chart: ThroughputChart | None = None
        self.memory: MemoryPanel | None = None
        self._summary: widgets.HTML | None = None
        parts: list[widgets.Widget] = [self._engine_bar, self._header, self.slots]
        if compact:
            self._summary = widgets.HTML("")
            parts.append(self._summary)
        else:
            self.chart = ThroughputChart(layout=widgets.Layout(flex="3 1 0", min_width="320px"))
            self.memory = MemoryPanel(
                layout=widgets.Layout(flex="1 1 0", min_width="240px", padding="0 0 0 12px")
            )
            parts.append(
                widgets.HBox([self.chart, self.memory], layout=widgets.Layout(width="100%"))
            )
        self._last_slow = 0.0
        self._link = EngineLink(
            self._on_engine, self._on_snapshot, interval=interval, on_engines=self._fill_selector
        )
        kwargs.setdefault("layout", widgets.Layout(width="100%"))
        super().__init__(parts, **kwargs)
        self.compact = compact
        self.add_class("nbollama-dashboard")
        follow = engine is None if follow_session is None else follow_session
        if follow and engine is None:
            self.following_session = True
            self._link.follow_session()
            self._fill_selector(session.engines())
        else:
            self._link.attach(engine)

    def _fill_selector(self, everyone: dict[str, EngineLike]) -> None:
        """One option per engine of the kernel, the one shown selected; shown only with several."""
        default = session.current_name()
        shown = self._link.engine
        options = [
            (f"{name}{' (default)' if name == default else ''} · {e.model_name} · {e.parallel} slots", name)
            for name, e in everyone.items()
        ]
        self._filling = True
        try:
            if list(self.selector.options) != options:
                self.selector.options = options
            names = [value for _, value in options]
            chosen = getattr(shown, "name", None)
            self.selector.value = chosen if chosen in names else (names[0] if names else None)
        finally:
            self._filling = False
        self.selector.layout.display = "" if len(options) > 1 else "none"
        self._show_pin(default)

    def _show_pin(self, default: str | None) -> None:
        """"pinned to 'small'" and the button back to the default, while the selector pins the view."""
        pinned = self._link.selected
        self.pinned = pinned or ""
        if pinned is None:
            self._pin_note.value = ""
        else:
            now = f"the default is '{default}'" if default not in (None, pinned) else "also the default now"
            self._pin_note.value = (
                f'<span class="nbollama-pinned" style="font-size:12px;padding:0 6px;border:1px solid #f57c00;'
                f'border-radius:8px" title="This dashboard ignores %nbollama use ({html.escape(now)})">'
                f"pinned to '{html.escape(pinned)}'</span>"
            )
        self._pin_note.layout.display = "none" if pinned is None else ""
        self.follow_button.layout.display = "none" if pinned is None else ""
        several = self.selector.layout.display != "none"
        self._engine_bar.layout.display = "" if several or pinned is not None else "none"

    def _on_select(self, change: dict[str, Any]) -> None:
        if not self._filling and change["new"] and self.following_session:
            self._link.select(change["new"])
            self._show_pin(session.current_name())

    def follow_default(self) -> None:
        """Unpin: show the kernel's default engine again and follow ``%nbollama use`` (the button)."""
        if not self.following_session:
            return
        self._link.select(None)
        self._fill_selector(session.engines())

    @property
    def engine(self) -> EngineLike | None:
        """The engine shown now (None with no engine)."""
        return self._link.engine

    @property
    def live(self) -> bool:
        """True while snapshots can still arrive."""
        return self._link.live

    # -- called with the link's lock held ------------------------------------------------

    def _on_engine(self, engine: EngineLike | None) -> None:
        if engine is None and self.snapshot_seq >= 0:
            # Unloaded after showing an engine: keep its last figures (a saved notebook's
            # dashboard keeps the run it watched) and say they are the last engine's.
            self.status = "no engine"
            self._header.value = _gone_hint(self.model_name)
            return
        self.slots.reset(engine)
        if self.chart is not None:
            self.chart.reset(engine)
        if self.memory is not None:
            self.memory.reset(engine)
        self.snapshot_seq = -1
        self._last_slow = 0.0
        if engine is None:
            self.status = "no engine"
            self.model_name, self.parallel, self.ctx_per_slot, self.parallel_reason = "", 0, 0, ""
            self._header.value = _HINT
            if self._summary is not None:
                self._summary.value = ""
            return
        self.status = "live"
        self.parallel = engine.parallel
        self._header.value = self._header_html()

    def _on_snapshot(self, snapshot: EngineSnapshot | None) -> None:
        if snapshot is None or snapshot["closed"]:
            self.status = "engine closed"
        now = time.monotonic()
        slow = (
            snapshot is None
            or snapshot["closed"]
            or snapshot["busy_slots"] == 0
            or now - self._last_slow >= SLOW_PARTS_INTERVAL
        )
        if slow:
            self._last_slow = now
        self.slots.update(snapshot)
        if self.chart is not None:
            self.chart.update(snapshot, draw=slow)
        if self.memory is not None and slow:
            self.memory.update(snapshot)
        if snapshot is not None:
            self._read_header(snapshot)
            self.snapshot_seq = snapshot["seq"]
            if self._summary is not None:
                self._summary.value = self._summary_html(snapshot)
        self.updates += 1
        self._header.value = self._header_html()

    def _read_header(self, snapshot: EngineSnapshot) -> None:
        """What the header shows comes from the snapshot, whatever kind of engine sent it."""
        self.model_name = snapshot["model"]["name"]
        self.parallel = snapshot["parallel"]
        self.ctx_per_slot = snapshot["ctx_per_slot"]
        self.n_batch = snapshot["n_batch"]
        self.gpu_layers = snapshot["gpu_layers"]
        self.parallel_reason = snapshot["parallel_reason"]
        self.reproducible = bool(snapshot.get("reproducible"))
        self.parallel_max = snapshot.get("parallel_max") or snapshot["parallel"]
        adaptive = snapshot.get("adaptive")
        self.adaptive_target = adaptive.get("target", "") if adaptive else ""
        cache = snapshot.get("prefix_cache")
        self.prefix_cache = (
            ""
            if cache is None
            else "prefix cache ?"  # a server that does not say
            if cache["enabled"] is None
            else f"prefix cache {cache['hit_rate']:.0%} hit"
            if cache["enabled"]
            else "prefix cache off"
        )
        kept = (cache or {}).get("ram_prompts")
        if kept:
            self.prefix_cache += f" · {kept} prompt{'s' if kept != 1 else ''} in RAM"
        self.kind = snapshot.get("kind", "local")
        self.endpoint = snapshot.get("endpoint") or ""
        self._remote = snapshot.get("remote")

    # -- rendering ----------------------------------------------------------------------

    _remote: Any = None
    #: "prefix cache 42% hit · 3 prompts in RAM" / "prefix cache off" (local engines), from the snapshot
    prefix_cache: str = ""
    #: batch-invariant decoding (``%nbollama load --reproducible``)
    reproducible: bool = False
    #: adaptive parallelism: the reserved slots and the target ("" when parallel is fixed)
    parallel_max: int = 0
    adaptive_target: str = ""

    def _remote_header(self, pill: str) -> tuple[str, str]:
        """The header of a remote engine: server, model, its parallel and context, this kernel's share."""
        remote = self._remote or {}

        def known(value: object) -> str:
            return "unknown" if value is None else str(value)

        line = (
            f"<b>nbollama</b> · {html.escape(self.kind)} <code>{html.escape(self.endpoint)}</code> · "
            f"<b>{html.escape(self.model_name)}</b> · server parallel <b>{known(remote.get('server_parallel'))}</b> · "
            f"ctx {known(self.ctx_per_slot)} · in flight {remote.get('in_flight', 0)}/{remote.get('max_inflight', '?')}"
            f" · queued {remote.get('waiting', 0)} {pill}"
        )
        detail = html.escape(remote.get("parallel_source", "") or self.parallel_reason)
        if remote and not remote.get("reachable", True):
            detail = (
                f'<span style="color:#c62828">server unreachable: {html.escape(str(remote.get("error")))}</span> · '
                + detail
            )
        return line, detail

    def _header_html(self) -> str:
        device = (
            "CPU"
            if self.gpu_layers == 0 or self.gpu_layers is None
            else ("GPU (all layers)" if self.gpu_layers < 0 else f"GPU ({self.gpu_layers} layers)")
        )
        pill = badge_html(self.status, style="outline")
        line = (
            f"<b>nbollama</b> · <b>{html.escape(self.model_name)}</b> · parallel <b>{self.parallel}</b>"
            + (
                f" of {self.parallel_max} (adaptive, {html.escape(self.adaptive_target)})"
                if self.adaptive_target
                else ""
            )
            + " · "
            f"ctx/slot <b>{self.ctx_per_slot}</b> · n_batch {self.n_batch} · {device}"
            + (" · <b>reproducible</b>" if self.reproducible else "")
            + (f" · {html.escape(self.prefix_cache)}" if self.prefix_cache else "")
            + f" {pill}"
        )
        reason = html.escape(self.parallel_reason)
        if self.kind != "local":
            line, detail = self._remote_header(pill)
            if self.compact:
                return f'<div class="nbollama-header" style="font-size:12px" title="{reason}">{line}</div>'
            return (
                f'<div class="nbollama-header nbollama-header-remote" style="font-size:13px">{line}'
                f'<div style="color:#757575;font-size:11px">server parallel: {detail}</div></div>'
            )
        if self.compact:
            return (
                f'<div class="nbollama-header" style="font-size:12px" title="{reason}">{line}</div>'
            )
        return (
            f'<div class="nbollama-header" style="font-size:13px">{line}'
            f'<div style="color:#757575;font-size:11px">'
            f"{'last change: ' if self.adaptive_target else _why(self.parallel, self.parallel_reason)}"
            f"{reason if self.adaptive_target else ''}</div></div>"
        )

    def _summary_html(self, snapshot: EngineSnapshot) -> str:
        totals = snapshot["totals"]
        return (
            '<div class="nbollama-summary" style="font-size:12px;font-family:monospace">'
            f"{snapshot['throughput']:.1f} tok/s · {snapshot['busy_slots']}/{snapshot['parallel']} busy · "
            f"queue {snapshot['queue']['length']} · {totals['completed']} done · "
            f"{html.escape(memory_summary(snapshot['memory']))} · "
            f"KV used {_known(snapshot['kv']['used'])}/{_known(snapshot['kv']['total'])} tok</div>"
        )

    def stop(self) -> None:
        """Stop the updates but keep showing the last state (``%%generate --watch`` after its run)."""
        with self._link.lock:
            self._link.close()
            self.status = "stopped"
            self._header.value = self._header_html()

    def close(self) -> None:
        """Stop the updates (the engine keeps running) and close every widget of the dashboard."""
        with self._link.lock:
            self._link.close()
            self.status = "closed"
        close_children(self)
        super().close()

    def __repr__(self) -> str:
        return (
            f"<nbollama Dashboard {self.status} {self.model_name or '-'} parallel={self.parallel}>"
        )


def _known(value: object) -> str:
    return "?" if value is None else str(value)


def dashboard(engine: EngineLike | None = None, *, compact: bool = False) -> Dashboard:
    """A live dashboard of ``engine``, or of the kernel's engine (followed across ``%nbollama load``).

    ``compact=True`` gives slot rows and a one-line summary, without the chart.
    Display it (last expression of a cell); ``stop()`` freezes it on its last
    state, ``close()`` stops it and removes it.
    """
    return Dashboard(engine, compact=compact)


def _why(parallel: int, reason: str) -> str:
    """"parallel=4, as asked" where the user chose it; "why parallel=4: <the rule's reason>" else."""
    if reason == "as asked":
        return f"parallel={parallel}, as asked"
    return f"why parallel={parallel}: {html.escape(reason)}"
