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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import memory as _memory
from ._api.metrics import summarize
from ._api.sweep import DEFAULT_PROMPTS, log_range, mark_on_log_axis, sweep_progress
from ._core._engine import Engine
from .exceptions import InvalidParamsError

__all__ = ["DEFAULT_PROMPTS", "SweepRow", "SweepResult", "sweep", "recommend"]



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
        import pandas as pd  # here, not at the top: `import nbollama` stays light

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
        mark_on_log_axis(
            fig, self.recommended, f"recommended: {self.recommended}", colour="green", xs=xs
        )
        fig.update_xaxes(
            title_text="parallel slots",
            type="log",
            tickvals=xs,
            ticktext=[str(x) for x in xs],
            range=log_range(xs),
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

    if engine is None:
        current = current_engine()
        if current is not None and not isinstance(current, Engine):
            raise InvalidParamsError(
                "the kernel's engine is a server: sweep its concurrency with "
                "nbollama.remote.remote_sweep (or %nbollama bench), or pass engine= an in-kernel Engine"
            )
        engine = current if current is not None else load_default()
    values = sorted(set(int(p) for p in parallel))
    if not values or values[0] < 1:
        raise InvalidParamsError(f"parallel values must be whole numbers >= 1, got {list(parallel)!r}")
    pool = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if n_prompts < 1:
        raise InvalidParamsError("n_prompts must be >= 1")
    chosen = [pool[i % len(pool)] for i in range(n_prompts)]
    ctx = ctx or min(engine.ctx, 1024)
    step = sweep_progress(len(values)) if progress else (lambda text: None)
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
