"""The parallelism sweep: measure, on this machine, what each parallel value buys.

For every value a fresh context is made on the SAME loaded weights
(``Engine.spawn``; the model file is not read again), the same prompts are
fired all at once, and the run is summarised: aggregate throughput, TTFT,
each request's own speed, and the memory it took. The recommendation is the
smallest parallel value within 10% of the best throughput, because past the
plateau more slots only add latency and memory.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import memory as _memory
from ._core._engine import Engine
from .metrics import summarize

__all__ = ["DEFAULT_PROMPTS", "SweepRow", "SweepResult", "sweep", "recommend"]

#: Short, varied prompts so answers differ in length, as real traffic does.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain in two sentences why the sky looks blue.",
    "Write a haiku about a GPU running out of memory.",
    "List three differences between a list and a tuple in Python.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What is the derivative of x squared times sine of x?",
    "Give a short definition of continuous batching.",
    "Write a Python function that reverses a string.",
    "Name four planets and one fact about each.",
    "Why do neural networks need non-linear activations?",
    "Describe the water cycle for a ten-year-old.",
    "Write a limerick about a cat who learns to code.",
    "What are the main causes of the French Revolution?",
    "Explain what a hash table is and when to use one.",
    "Give three tips for writing a clear abstract.",
    "What is the difference between latency and throughput?",
    "Explain the Pythagorean theorem with an example.",
    "Write a SQL query that counts orders per customer.",
    "What does a key-value cache store in a transformer?",
    "Suggest a name for a coffee shop run by robots.",
    "Describe how a bicycle stays upright.",
    "What is photosynthesis, in one paragraph?",
    "Give an example of a recursive function.",
    "Why is the ocean salty?",
    "Explain what a compiler does.",
)


@dataclass(frozen=True)
class SweepRow:
    """One parallel value's measurements."""

    parallel: int
    requests: int
    completion_tokens: int
    wall_time: float
    throughput: float  # aggregate completion tokens/s
    mean_ttft: float
    p95_ttft: float
    mean_gen_tps: float  # mean of each request's own tokens/s
    peak_memory: int  # bytes: peak GPU used (NVML) or process RSS (host) during the run
    memory_source: str
    kv_bytes: int


@dataclass
class SweepResult:
    """The table, the recommendation and a plot of a sweep."""

    rows: list[SweepRow]
    recommended: int
    reason: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def to_pandas(self) -> Any:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.to_records()).set_index("parallel")

    def speedup(self, parallel: int, over: int | None = None) -> float:
        """Throughput at ``parallel`` relative to ``over`` (default: the smallest value swept)."""
        by = {r.parallel: r.throughput for r in self.rows}
        base = by[over if over is not None else min(by)]
        return by[parallel] / base if base else math.nan

    def figure(self) -> Any:
        """Throughput and latency against parallel (plotly)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        xs = [r.parallel for r in self.rows]
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        fig.add_trace(
            go.Scatter(x=xs, y=[r.throughput for r in self.rows], name="throughput (tok/s)", mode="lines+markers"),
            secondary_y=False,
        )
        fig.add_trace(
            go.Scatter(x=xs, y=[r.mean_ttft for r in self.rows], name="mean TTFT (s)", mode="lines+markers", line={"dash": "dot"}),
            secondary_y=True,
        )
        fig.add_trace(
            go.Scatter(x=xs, y=[r.mean_gen_tps for r in self.rows], name="per-request tok/s", mode="lines+markers", line={"dash": "dash"}),
            secondary_y=False,
        )
        _mark_on_log_axis(
            fig, self.recommended, f"recommended: {self.recommended}", colour="green", xs=xs
        )
        fig.update_xaxes(
            title_text="parallel slots",
            type="log",
            tickvals=xs,
            ticktext=[str(x) for x in xs],
            range=_log_range(xs),
        )
        fig.update_yaxes(title_text="tokens/s", rangemode="tozero", secondary_y=False)
        fig.update_yaxes(
            title_text="seconds", rangemode="tozero", showgrid=False, tickmode="auto", secondary_y=True
        )
        fig.update_layout(
            title="Throughput rises, then flattens; latency keeps growing",
            height=420,
            legend={"orientation": "h", "y": -0.22},
            margin={"b": 70},
        )
        return fig

    def _repr_html_(self) -> str:
        head = "".join(
            f"<th>{h}</th>"
            for h in ("parallel", "tok/s", "vs first", "mean TTFT s", "p95 TTFT s", "per-request tok/s", "peak memory", "KV cache")
        )
        bold = ' style="font-weight:bold"'
        body = "".join(
            f"<tr{bold if r.parallel == self.recommended else ''}>"
            f"<td>{r.parallel}</td><td>{r.throughput:.1f}</td><td>{self.speedup(r.parallel):.2f}x</td>"
            f"<td>{r.mean_ttft:.2f}</td><td>{r.p95_ttft:.2f}</td><td>{r.mean_gen_tps:.1f}</td>"
            f"<td>{_memory.format_bytes(r.peak_memory)}</td><td>{_memory.format_bytes(r.kv_bytes)}</td></tr>"
            for r in self.rows
        )
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p><b>Recommendation: parallel={self.recommended}</b>: {self.reason}</p>"
        )

    def __str__(self) -> str:
        lines = ["parallel  tok/s  vs-first  meanTTFT  p95TTFT  req-tok/s  peak-mem"]
        for r in self.rows:
            lines.append(
                f"{r.parallel:>8}  {r.throughput:5.1f}  {self.speedup(r.parallel):7.2f}x  {r.mean_ttft:8.2f}  "
                f"{r.p95_ttft:7.2f}  {r.mean_gen_tps:9.1f}  {_memory.format_bytes(r.peak_memory)}"
            )
        lines.append(f"recommended: parallel={self.recommended} ({self.reason})")
        return "\n".join(lines)


def _log_range(xs: Sequence[float], pad: float = 0.12) -> list[float]:
    """An x range for a log axis, in plotly's units for one (log10), a little wider than ``xs``.

    Left to autorange, a log axis with a single value, or with a shape or
    annotation placed in data units, can stretch far past the data.
    """
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    span = max(hi - lo, 0.3)
    return [lo - pad * span, hi + pad * span]


def _mark_on_log_axis(
    fig: Any, x: float, text: str, *, colour: str, xs: Sequence[float], dash: str = "dash"
) -> None:
    """A vertical line at ``x`` on a log x axis, labelled at its top.

    ``add_vline`` puts its label at ``x`` as if the axis were linear, but a
    log axis places annotations at log10(x): the label of ``recommended: 8``
    landed at 10^8 and dragged the axis range with it. The line is a shape
    (data units), the label an annotation at log10(x), on the side of the
    line with more room (``xs``: the values on the axis).
    """
    middle = (math.log10(min(xs)) + math.log10(max(xs))) / 2
    anchor = "right" if math.log10(x) > middle else "left"
    fig.add_shape(
        type="line",
        xref="x",
        yref="paper",
        x0=x,
        x1=x,
        y0=0,
        y1=1,
        line={"color": colour, "dash": dash},
    )
    fig.add_annotation(
        x=math.log10(x),
        xref="x",
        y=1,
        yref="paper",
        text=text,
        showarrow=False,
        xanchor=anchor,
        yanchor="bottom",
        font={"color": colour},
    )


def recommend(rows: Sequence[SweepRow], within: float = 0.9) -> tuple[int, str]:
    """The smallest parallel value reaching ``within`` of the best throughput, and why."""
    best = max(rows, key=lambda r: r.throughput)
    good = [r for r in rows if r.throughput >= within * best.throughput]
    pick = min(good, key=lambda r: r.parallel)
    if pick.parallel == best.parallel:
        reason = f"it gave the highest throughput ({best.throughput:.1f} tok/s)"
    else:
        reason = (
            f"it reaches {pick.throughput / best.throughput:.0%} of the best throughput "
            f"({pick.throughput:.1f} vs {best.throughput:.1f} tok/s at parallel={best.parallel}) "
            f"with less memory and lower latency (mean TTFT {pick.mean_ttft:.2f} s vs {best.mean_ttft:.2f} s)"
        )
    return pick.parallel, reason


class _PeakMemory:
    """Samples memory in the background while a run goes on (10 Hz)."""

    def __init__(self) -> None:
        self.peak = 0
        self.source = "host"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="nbollama-bench-memory")

    def _read(self) -> int:
        gpus = _memory.gpu_figures()
        if gpus:
            self.source = "nvml"
            return sum(g["process_used"] or g["used"] for g in gpus)
        return int(_memory.host_figures()["process_rss"] or 0)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(0.1)

    def __enter__(self) -> _PeakMemory:
        self.peak = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def _progress(total: int) -> Callable[[str], None]:
    """A widget progress bar in a notebook kernel, a printed line elsewhere."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None and getattr(shell, "kernel", None) is not None:
            import ipywidgets as widgets
            from IPython.display import display

            bar = widgets.IntProgress(value=0, min=0, max=total, description="sweep", bar_style="info")
            label = widgets.Label("starting")
            display(widgets.HBox([bar, label]))

            def step(text: str) -> None:
                bar.value = min(total, bar.value + 1)
                label.value = text
                if bar.value >= total:
                    bar.bar_style = "success"

            return step
    except ImportError:
        pass
    count = [0]

    def step_text(text: str) -> None:
        count[0] += 1
        print(f"[{count[0]}/{total}] {text}", flush=True)

    return step_text


def sweep(
    engine: Engine | None = None,
    *,
    parallel: Iterable[int] = (1, 2, 4, 8),
    prompts: Sequence[str] | None = None,
    n_prompts: int = 16,
    max_tokens: int = 64,
    ctx: int | None = None,
    temperature: float = 0.0,
    progress: bool = True,
) -> SweepResult:
    """Run the same prompts at each parallel value on the engine's weights; see the module doc."""
    from .session import current_engine
    from .session import load as load_default

    engine = engine or current_engine() or load_default()
    values = sorted(set(int(p) for p in parallel))
    if not values or values[0] < 1:
        raise ValueError(f"parallel values must be whole numbers >= 1, got {list(parallel)!r}")
    pool = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if n_prompts < 1:
        raise ValueError("n_prompts must be >= 1")
    chosen = [pool[i % len(pool)] for i in range(n_prompts)]
    ctx = ctx or min(engine.ctx, 1024)
    step = _progress(len(values)) if progress else (lambda text: None)
    rows: list[SweepRow] = []
    for n in values:
        with engine.spawn(parallel=n, ctx=ctx) as trial:
            trial.generate([chosen[0]], max_tokens=2, temperature=temperature)  # warm up
            with _PeakMemory() as peak:
                started = time.perf_counter()
                results = trial.generate(chosen, max_tokens=max_tokens, temperature=temperature)
                wall = time.perf_counter() - started
            s = summarize(results, wall)
            rows.append(
                SweepRow(
                    parallel=n,
                    requests=s.requests,
                    completion_tokens=s.completion_tokens,
                    wall_time=wall,
                    throughput=s.throughput,
                    mean_ttft=s.mean_ttft,
                    p95_ttft=s.p95_ttft,
                    mean_gen_tps=s.mean_gen_tps,
                    peak_memory=peak.peak,
                    memory_source=peak.source,
                    kv_bytes=trial.kv_bytes,
                )
            )
        step(f"parallel={n}: {s.throughput:.1f} tok/s")
    recommended, reason = recommend(rows)
    return SweepResult(
        rows=rows,
        recommended=recommended,
        reason=reason,
        settings={"prompts": len(chosen), "max_tokens": max_tokens, "ctx": ctx, "model": engine.model_name},
    )
