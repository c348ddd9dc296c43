"""The throughput chart: aggregate tokens/s and busy slots over the last minute, TTFT per request.

A plotly ``FigureWidget`` updated in place inside ``batch_update()`` (one
message per redraw, never a rebuilt figure). The plotted numbers are also
kept as plain lists, so they can be compared with the engine's own metrics.

Redraws happen on the engine's monitor thread, while plotly's answers from
the browser (the trace and layout deltas it sends after every redraw, a
zoom) are handled on the kernel's main thread; one lock keeps the two from
editing the figure at the same time.

The chart fills its box: plotly's widget draws once, before it is on the
page, and so at plotly's default 700 px; a tiny companion widget (``FitToBox``)
watches the box and has plotly resize whenever its width changes (a side
panel opened, the window resized).
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

import anywidget
import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from traitlets import Bool, Float, Int, List, observe

from .._api.protocol import EngineLike
from .._api.snapshot import CompletedRequest, EngineSnapshot
from .._logging import logger
from ._live import DEFAULT_INTERVAL, LiveView, imports_in_progress

__all__ = ["ThroughputChart", "FitToBox"]

_THROUGHPUT, _BUSY, _TTFT, _QUEUE_WAIT, _ACTIVE, _CHANGES = range(6)
_RETRY_SECONDS = 0.2
_ADAPTIVE_COLOUR = "#6a1b9a"

#: The browser side of ``FitToBox``: find the chart's box, watch its size, and
#: when a plotly chart in it is not as wide as the box, call plotly's own
#: resize handler (present because the figure has ``responsive: true``).
_FIT_ESM = """
function fit(box) {
  for (const gd of box.querySelectorAll('.js-plotly-plot')) {
    const svg = gd.querySelector('.main-svg');
    const want = gd.clientWidth;
    if (!svg || want < 10) continue;
    if (Math.abs(svg.getBoundingClientRect().width - want) < 2) continue;
    if (typeof gd._responsiveChartHandler === 'function') gd._responsiveChartHandler();
  }
}
export default {
  render({ el }) {
    let observer = null;
    let pending = null;
    let tries = 0;
    const timers = [];
    const later = (f, ms) => timers.push(setTimeout(f, ms));
    const attach = () => {
      const box = el.closest('.nbollama-fit-box');
      if (box === null) {
        if (tries++ < 150) later(attach, 200);
        return;
      }
      observer = new ResizeObserver(() => {
        if (pending === null) {
          pending = setTimeout(() => { pending = null; fit(box); }, 80);
        }
      });
      observer.observe(box);
      // plotly may draw after this view: look again while it settles
      for (const ms of [50, 300, 1000, 3000]) later(() => fit(box), ms);
    };
    attach();
    return () => {
      if (observer !== null) observer.disconnect();
      if (pending !== null) clearTimeout(pending);
      timers.forEach(clearTimeout);
    };
  }
};
"""


class FitToBox(anywidget.AnyWidget):
    """Keeps the plotly charts of its container (class ``nbollama-fit-box``) as wide as the container.

    Invisible; put it beside a ``FigureWidget`` whose ``_config`` has
    ``responsive: True``. plotly's widget has no resize observer of its own
    (it resizes on window resizes only), so a chart drawn before it was on
    the page, or in a box that later narrowed, would keep its first width.
    """

    _esm = _FIT_ESM

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("layout", widgets.Layout(display="none"))
        super().__init__(**kwargs)


class GuardedFigureWidget(go.FigureWidget):
    """A ``FigureWidget`` whose messages from the browser wait for ``lock``.

    Each ``_js2py_*`` handler is re-declared under its own name, which
    replaces plotly's observer with one that holds the lock around it.
    """

    def __init__(self, figure: go.Figure, lock: threading.RLock) -> None:
        self._guard = lock
        super().__init__(figure)

    @observe("_js2py_traceDeltas")
    def _handler_js2py_traceDeltas(self, change: dict[str, Any]) -> None:
        with self._guard:
            super()._handler_js2py_traceDeltas(change)

    @observe("_js2py_layoutDelta")
    def _handler_js2py_layoutDelta(self, change: dict[str, Any]) -> None:
        with self._guard:
            super()._handler_js2py_layoutDelta(change)

    @observe("_js2py_restyle")
    def _handler_js2py_restyle(self, change: dict[str, Any]) -> None:
        with self._guard:
            super()._handler_js2py_restyle(change)

    @observe("_js2py_update")
    def _handler_js2py_update(self, change: dict[str, Any]) -> None:
        with self._guard:
            super()._handler_js2py_update(change)

    @observe("_js2py_relayout")
    def _handler_js2py_relayout(self, change: dict[str, Any]) -> None:
        with self._guard:
            super()._handler_js2py_relayout(change)

    @observe("_js2py_pointsCallback")
    def _handler_js2py_pointsCallback(self, change: dict[str, Any]) -> None:
        with self._guard:
            super()._handler_js2py_pointsCallback(change)


class ThroughputChart(LiveView, widgets.VBox):
    """Throughput and busy slots (top, last ``window`` seconds); TTFT and queue wait per request (bottom).

    Time series points come from snapshots, so they are at most 4 a second
    and none while nothing changes. Requests are taken from each snapshot's
    ``recent`` list once each (by id), so the bottom chart gains a bar pair
    per finished request.
    """

    window = Float(60.0)
    max_requests = Int(60)
    times: List[float] = List()  # time.time() of each point
    throughput: List[float] = List()  # aggregate generated tokens/s (the snapshot's ``throughput``)
    busy: List[int] = List()  # busy slots
    active: List[int] = List()  # slots taking requests (adaptive parallelism moves it)
    adaptive = Bool(False)  # whether the engine is adaptive (the active-slots line is shown)
    #: adaptive parallelism's changes in the window: (time.time(), parallel, reason), oldest first
    changes: List[tuple[float, int, str]] = List()
    request_ids: List[int] = List()
    ttft: List[float | None] = List()  # seconds; None when a request ended before its first token
    queue_wait: List[float] = List()
    last_throughput = Float(0.0)
    last_busy = Int(0)
    parallel = Int(0)
    engine_closed = Bool(False)

    def __init__(
        self, engine: EngineLike | None = None, *, interval: float = DEFAULT_INTERVAL, **kwargs: Any
    ) -> None:
        #: held while the figure is edited, by our redraws and by the browser's messages
        self.figure_lock = threading.RLock()
        self.figure = GuardedFigureWidget(self._base_figure(), self.figure_lock)
        # plotly resizes only with ``responsive``; ``FitToBox`` tells it when the box changed
        self.figure._config = {**(self.figure._config or {}), "responsive": True}
        self._seen: set[int] = set()
        self._requests_drawn = True
        self._retry: threading.Timer | None = None
        kwargs.setdefault("layout", widgets.Layout(width="100%"))
        super().__init__([self.figure, FitToBox()], **kwargs)
        self.add_class("nbollama-throughput-chart")
        self.add_class("nbollama-fit-box")
        self._follow(engine, interval)

    @staticmethod
    def _base_figure() -> go.Figure:
        fig = make_subplots(
            rows=2,
            cols=1,
            specs=[[{"secondary_y": True}], [{}]],
            row_heights=[0.6, 0.4],
            vertical_spacing=0.16,
            subplot_titles=("throughput and busy slots", "per request: TTFT and queue wait"),
        )
        fig.add_trace(
            go.Scatter(
                x=[],
                y=[],
                name="throughput (tok/s)",
                mode="lines",
                fill="tozeroy",
                line={"color": "#1e88e5"},
            ),
            row=1,
            col=1,
            secondary_y=False,
        )
        fig.add_trace(
            go.Scatter(
                x=[],
                y=[],
                name="busy slots",
                mode="lines",
                line={"color": "#f0a202", "shape": "hv", "width": 2},
            ),
            row=1,
            col=1,
            secondary_y=True,
        )
        fig.add_trace(
            go.Bar(x=[], y=[], name="ttft (s)", marker={"color": "#90caf9"}), row=2, col=1
        )
        fig.add_trace(
            go.Bar(x=[], y=[], name="queue wait (s)", marker={"color": "#8d6e63"}), row=2, col=1
        )
        fig.add_trace(
            go.Scatter(
                x=[],
                y=[],
                name="active slots (adaptive)",
                mode="lines",
                visible=False,
                line={"color": _ADAPTIVE_COLOUR, "shape": "hv", "width": 2, "dash": "dot"},
            ),
            row=1,
            col=1,
            secondary_y=True,
        )
        fig.add_trace(
            go.Scatter(
                x=[],
                y=[],
                name="parallel changes",
                mode="markers+text",
                visible=False,
                text=[],
                textposition="top center",
                textfont={"color": _ADAPTIVE_COLOUR, "size": 11},
                cliponaxis=False,
                hovertemplate="%{hovertext}<extra></extra>",
                marker={
                    "color": _ADAPTIVE_COLOUR,
                    "symbol": "diamond",
                    "size": 10,
                    "line": {"color": "white", "width": 1},
                },
            ),
            row=1,
            col=1,
            secondary_y=True,
        )
        fig.update_layout(
            height=380,
            margin={"l": 50, "r": 50, "t": 40, "b": 30},
            barmode="overlay",  # queue wait drawn over the TTFT it is part of
            legend={"orientation": "h", "y": -0.12},
            uirevision="nbollama",  # keep the user's zoom across updates
        )
        fig.update_yaxes(title_text="tok/s", rangemode="tozero", row=1, col=1, secondary_y=False)
        fig.update_yaxes(
            title_text="busy slots",
            dtick=1,
            rangemode="tozero",
            showgrid=False,
            row=1,
            col=1,
            secondary_y=True,
        )
        fig.update_xaxes(tickformat="%H:%M:%S", row=1, col=1)
        fig.update_yaxes(title_text="s", rangemode="tozero", row=2, col=1)
        fig.update_xaxes(type="category", row=2, col=1)
        return fig

    @property
    def ttft_by_id(self) -> dict[int, float | None]:
        return dict(zip(self.request_ids, self.ttft))

    def reset(self, engine: EngineLike | None) -> None:
        """Empty the chart for a new engine (its request ids start again at 1)."""
        self._seen = set()
        self._requests_drawn = True
        self.times, self.throughput, self.busy, self.active = [], [], [], []
        self.adaptive = False
        self.changes = []
        self.request_ids, self.ttft, self.queue_wait = [], [], []
        self.parallel = engine.parallel if engine is not None else 0
        self.engine_closed = False
        self.last_throughput, self.last_busy = 0.0, 0
        with self.figure_lock, self.figure.batch_update():
            for trace in self.figure.data:
                trace.x, trace.y = [], []
            self.figure.layout.yaxis2.range = [0, max(1, self.parallel)]

    def update(self, snapshot: EngineSnapshot | None, *, draw: bool = True) -> None:
        """Record a snapshot's point (and any newly finished requests); redraw unless ``draw=False``.

        The dashboard records every snapshot but redraws at most once a
        second while the engine is busy: the figure's arrays are the bulk of
        what a dashboard sends, and a 60 s window gains nothing from 4 Hz.
        """
        if snapshot is None or snapshot["closed"]:
            self.engine_closed = True
            if snapshot is None:
                return
        now = snapshot["time"]
        self.parallel = (
            snapshot.get("parallel_max") or snapshot["parallel"]
        )  # the axis spans every slot
        start = now - self.window
        keep = next((i for i, t in enumerate(self.times) if t >= start), len(self.times))
        self.times = [*self.times[keep:], now]
        self.throughput = [*self.throughput[keep:], snapshot["throughput"]]
        self.busy = [*self.busy[keep:], snapshot["busy_slots"]]
        self.active = [*self.active[keep:], snapshot["parallel"]]
        adaptive = snapshot.get("adaptive")
        self.adaptive = self.adaptive or bool(adaptive)
        if adaptive:
            self.changes = [
                (c["time"], c["parallel"], c["reason"])
                for c in adaptive["history"]
                if c["time"] >= start
            ]
        self.last_throughput = snapshot["throughput"]
        self.last_busy = snapshot["busy_slots"]
        fresh = [r for r in snapshot["recent"] if r["id"] not in self._seen]
        if fresh:
            self._add_requests(fresh)
            self._requests_drawn = False
        # ``recent`` only ever drops its oldest, so ids that left it never come back
        self._seen = {r["id"] for r in snapshot["recent"]}
        if draw:
            self.draw()

    def draw(self) -> None:
        """Send the recorded data to the figure: one ``batch_update``, one message.

        While another thread is importing a module, the redraw is put off
        (``imports_in_progress``) and retried shortly on a timer.
        """
        if not self.times:
            return
        if imports_in_progress():
            with self.figure_lock:
                if self._retry is None or not self._retry.is_alive():
                    self._retry = threading.Timer(_RETRY_SECONDS, self._draw_quietly)
                    self._retry.name = "nbollama-chart-redraw"
                    self._retry.daemon = True
                    self._retry.start()
            return
        now = self.times[-1]
        stamps = [datetime.fromtimestamp(t) for t in self.times]
        with self.figure_lock, self.figure.batch_update():
            data = self.figure.data
            data[_THROUGHPUT].x, data[_THROUGHPUT].y = stamps, self.throughput
            data[_BUSY].x, data[_BUSY].y = stamps, self.busy
            if self.adaptive:  # each change of the active count is a step in this line...
                data[_ACTIVE].visible = True
                data[_ACTIVE].x, data[_ACTIVE].y = stamps, self.active
                # ...and a marker with the new count, its reason on hover
                marks = data[_CHANGES]
                marks.visible = True
                marks.x = [datetime.fromtimestamp(t) for t, _, _ in self.changes]
                marks.y = [p for _, p, _ in self.changes]
                marks.text = [f"→{p}" for _, p, _ in self.changes]
                marks.hovertext = [reason for _, _, reason in self.changes]
            if not self._requests_drawn:
                labels = [f"#{i}" for i in self.request_ids]
                data[_TTFT].x, data[_TTFT].y = labels, self.ttft
                data[_QUEUE_WAIT].x, data[_QUEUE_WAIT].y = labels, self.queue_wait
                self._requests_drawn = True
            layout = self.figure.layout
            layout.xaxis.range = [
                datetime.fromtimestamp(now - self.window),
                datetime.fromtimestamp(now),
            ]
            layout.yaxis2.range = [0, max(1, self.parallel)]

    def _draw_quietly(self) -> None:
        """``draw`` from a timer thread: a chart closed meanwhile must not print a traceback."""
        try:
            self.draw()
        except Exception:
            logger.debug("nbollama: a delayed chart redraw failed", exc_info=True)

    def _add_requests(self, fresh: list[CompletedRequest]) -> None:
        ids, ttft, wait = list(self.request_ids), list(self.ttft), list(self.queue_wait)
        for request in fresh:
            ids.append(request["id"])
            ttft.append(request["ttft"])
            wait.append(request["queue_wait"])
        drop = max(0, len(ids) - self.max_requests)
        self.request_ids, self.ttft, self.queue_wait = ids[drop:], ttft[drop:], wait[drop:]
