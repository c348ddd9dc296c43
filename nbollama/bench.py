"""The parallelism sweep: measure, on this machine, what each parallel value buys.

For every value a fresh context is made on the SAME loaded weights
(``Engine.spawn``; the model file is not read again), the same prompts are
fired all at once, and the run is summarised: aggregate throughput, TTFT,
each request's own speed, and the memory it took. The recommendation is the
smallest parallel value within 10% of the best throughput, because past the
plateau more slots only add latency and memory. With ``kv_types`` the sweep
also runs each KV-cache type, measures its quality against f16
(``kv_quality``) and recommends the smallest type whose quality and throughput
both hold (``recommend_kv``).
"""

from __future__ import annotations

import html
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import memory as _memory
from ._api.kvcache import server_kv_words
from ._api.metrics import summarize
from ._api.sweep import DEFAULT_PROMPTS, log_range, mark_on_log_axis, sweep_progress
from ._core._engine import Engine
from ._kvquality import KVQualityResult, KVQualityRow, kv_quality
from .exceptions import InvalidParamsError

__all__ = [
    "DEFAULT_PROMPTS",
    "SweepRow",
    "SweepResult",
    "KVQualityRow",
    "KVQualityResult",
    "sweep",
    "recommend",
    "recommend_kv",
    "kv_quality",
]



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
    kv_type: str = "f16"


@dataclass
class SweepResult:
    """The table, the recommendation and a plot of a sweep."""

    rows: list[SweepRow]
    recommended: int
    reason: str
    settings: dict[str, Any] = field(default_factory=dict)
    #: with ``kv_types``: the type recommended, and each type's quality against f16
    recommended_kv_type: str | None = None
    quality: KVQualityResult | None = None

    @property
    def kv_types(self) -> list[str]:
        return list(dict.fromkeys(r.kv_type for r in self.rows))

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def to_pandas(self) -> Any:
        """One row per parallel value; indexed by (kv_type, parallel) when types were swept."""
        import pandas as pd  # here, not at the top: `import nbollama` stays light

        frame = pd.DataFrame(self.to_records())
        if len(self.kv_types) > 1:
            return frame.set_index(["kv_type", "parallel"])
        return frame.set_index("parallel")

    def speedup(self, parallel: int, over: int | None = None, *, kv_type: str | None = None) -> float:
        """Throughput at ``parallel`` relative to ``over`` (default: the smallest value swept), in one KV type."""
        kind = kv_type or self.kv_types[0]
        by = {r.parallel: r.throughput for r in self.rows if r.kv_type == kind}
        base = by[over if over is not None else min(by)]
        return by[parallel] / base if base else math.nan

    @property
    def kv_benefit(self) -> bool:
        """Whether the sweep measured a smaller KV type worth using (then servers get its setting)."""
        return self.recommended_kv_type is not None and self.recommended_kv_type != self.kv_types[0]

    def server_settings(self) -> dict[str, str]:
        """The recommended KV type in each server's own words; empty unless the sweep measured a benefit."""
        if not self.kv_benefit or self.recommended_kv_type is None:
            return {}
        kv = self.recommended_kv_type
        return {
            kind: server_kv_words(kind, kv, kv, model=str(self.settings.get("model_path", "")))
            for kind in ("ollama", "llama-server", "vllm")
        }

    def figure(self) -> Any:
        """Throughput and latency against parallel (plotly); one throughput line per KV type swept."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        types = self.kv_types
        xs = sorted({r.parallel for r in self.rows})
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        for kind in types:
            rows = [r for r in self.rows if r.kv_type == kind]
            suffix = f" {kind}" if len(types) > 1 else ""
            fig.add_trace(
                go.Scatter(x=[r.parallel for r in rows], y=[r.throughput for r in rows], name=f"throughput{suffix} (tok/s)", mode="lines+markers"),
                secondary_y=False,
            )
            if len(types) == 1:
                fig.add_trace(
                    go.Scatter(x=[r.parallel for r in rows], y=[r.mean_ttft for r in rows], name="mean TTFT (s)", mode="lines+markers", line={"dash": "dot"}),
                    secondary_y=True,
                )
                fig.add_trace(
                    go.Scatter(x=[r.parallel for r in rows], y=[r.mean_gen_tps for r in rows], name="per-request tok/s", mode="lines+markers", line={"dash": "dash"}),
                    secondary_y=False,
                )
        label = f"recommended: {self.recommended}" + (
            f" ({self.recommended_kv_type})" if len(types) > 1 else ""
        )
        mark_on_log_axis(fig, self.recommended, label, colour="green", xs=xs)
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
        title = (
            "Throughput per KV cache type"
            if len(types) > 1
            else "Throughput rises, then flattens; latency keeps growing"
        )
        fig.update_layout(title=title, height=420, legend={"orientation": "h", "y": -0.22}, margin={"b": 70})
        return fig

    def _best(self, row: SweepRow) -> bool:
        return row.parallel == self.recommended and row.kv_type == (self.recommended_kv_type or row.kv_type)

    def _repr_html_(self) -> str:
        typed = len(self.kv_types) > 1
        head = "".join(
            f"<th>{h}</th>"
            for h in (("KV type",) if typed else ())
            + ("parallel", "tok/s", "vs first", "mean TTFT s", "p95 TTFT s", "per-request tok/s", "peak memory", "KV cache")
        )
        bold = ' style="font-weight:bold"'
        body = "".join(
            f"<tr{bold if self._best(r) else ''}>"
            + (f"<td>{r.kv_type}</td>" if typed else "")
            + f"<td>{r.parallel}</td><td>{r.throughput:.1f}</td><td>{self.speedup(r.parallel, kv_type=r.kv_type):.2f}x</td>"
            f"<td>{r.mean_ttft:.2f}</td><td>{r.p95_ttft:.2f}</td><td>{r.mean_gen_tps:.1f}</td>"
            f"<td>{_memory.format_bytes(r.peak_memory)}</td><td>{_memory.format_bytes(r.kv_bytes)}</td></tr>"
            for r in self.rows
        )
        what = f"parallel={self.recommended}" + (
            f", kv_type={self.recommended_kv_type}" if typed else ""
        )
        parts = [
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
            f"<p><b>Recommendation: {what}</b>: {html.escape(self.reason)}</p>",
        ]
        if self.quality is not None:
            parts.append(f"<p>Quality against f16:</p>{self.quality._repr_html_()}")
        settings = self.server_settings()
        if settings:
            parts.append(
                "<details><summary>The same KV type on a server</summary>"
                + "".join(
                    f"<p>{kind}:</p><pre>{html.escape(text)}</pre>" for kind, text in settings.items()
                )
                + "</details>"
            )
        return "".join(parts)

    def __str__(self) -> str:
        typed = len(self.kv_types) > 1
        lines = [("kv_type  " if typed else "") + "parallel  tok/s  vs-first  meanTTFT  p95TTFT  req-tok/s  peak-mem"]
        for r in self.rows:
            lines.append(
                (f"{r.kv_type:<7}  " if typed else "")
                + f"{r.parallel:>8}  {r.throughput:5.1f}  {self.speedup(r.parallel, kv_type=r.kv_type):7.2f}x  "
                f"{r.mean_ttft:8.2f}  {r.p95_ttft:7.2f}  {r.mean_gen_tps:9.1f}  {_memory.format_bytes(r.peak_memory)}"
            )
        what = f"parallel={self.recommended}" + (f" kv_type={self.recommended_kv_type}" if typed else "")
        lines.append(f"recommended: {what} ({self.reason})")
        if self.quality is not None:
            lines.append(str(self.quality))
        for kind, text in self.server_settings().items():
            lines.append(f"on {kind}:\n{text}")
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


#: A KV type is worth its memory saving while its mean KL from f16 stays under this (nats).
#: llama.cpp measured q8_0 at about 0.001 (PR #7412); 0.01 is ten times that.
MAX_KV_KL = 0.01
#: ... and while it keeps this share of the base type's throughput.
MIN_KV_THROUGHPUT = 0.95


def recommend_kv(
    rows: Sequence[SweepRow],
    quality: KVQualityResult | None,
    *,
    max_kl: float = MAX_KV_KL,
    min_throughput: float = MIN_KV_THROUGHPUT,
) -> tuple[str, int, str]:
    """``(kv_type, parallel, why)``: the smallest KV whose quality and throughput both hold.

    Each type's parallel is picked by ``recommend`` among its own rows. A type
    qualifies when its mean KL from f16 is at most ``max_kl`` and its
    throughput at that parallel is at least ``min_throughput`` of the first
    type's; of those, the one with the fewest KV bytes per slot wins.
    """
    types = list(dict.fromkeys(r.kv_type for r in rows))
    base = types[0]
    picks = {t: recommend([r for r in rows if r.kv_type == t]) for t in types}
    row_of = {
        t: next(r for r in rows if r.kv_type == t and r.parallel == picks[t][0]) for t in types
    }
    per_slot = {t: row_of[t].kv_bytes / max(1, row_of[t].parallel) for t in types}
    refused: list[str] = []
    fits = [base]
    for t in types[1:]:
        speed = row_of[t].throughput / row_of[base].throughput if row_of[base].throughput else 0.0
        kl = quality.row(t).mean_kl if quality is not None else math.nan
        if quality is None:
            refused.append(f"{t}: no quality measured")
        elif not kl <= max_kl:
            refused.append(f"{t}: mean KL {kl:.4f} > {max_kl}")
        elif speed < min_throughput:
            refused.append(f"{t}: {speed:.2f}x the throughput of {base}")
        else:
            fits.append(t)
    pick = min(fits, key=lambda t: per_slot[t])
    parallel = picks[pick][0]
    if pick == base:
        reason = f"{base} at parallel={parallel}: {picks[base][1]}" + (
            f"; smaller types cost too much ({'; '.join(refused)})" if refused else ""
        )
        return base, parallel, reason
    ratio = per_slot[pick] / per_slot[base]
    speed = row_of[pick].throughput / row_of[base].throughput
    kl = quality.row(pick).mean_kl if quality is not None else math.nan
    agree = quality.row(pick).greedy_agreement if quality is not None else math.nan
    reason = (
        f"{pick} keeps {speed:.2f}x {base}'s throughput at parallel={parallel} with {ratio:.2f}x its KV bytes "
        f"per slot ({1 / ratio:.1f}x the slots in the same memory); mean KL {kl:.4f} nats, "
        f"{agree:.0%} of greedy texts unchanged"
        + (f"; not chosen: {'; '.join(refused)}" if refused else "")
    )
    return pick, parallel, reason


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
    kv_types: Sequence[str] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run the same prompts at each parallel value on the engine's weights; see the module doc.

    ``kv_types`` (e.g. ``("f16", "q8_0", "q4_0")``) sweeps each KV cache type
    x parallel, measures each type's quality against f16 with ``kv_quality``,
    and recommends a type too (``recommend_kv``).
    """
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
    types = _kv_types_to_sweep(engine, kv_types)
    pool = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if n_prompts < 1:
        raise InvalidParamsError("n_prompts must be >= 1")
    chosen = [pool[i % len(pool)] for i in range(n_prompts)]
    ctx = ctx or min(engine.ctx, 1024)
    step = sweep_progress(len(values) * len(types) + (len(types) > 1)) if progress else (lambda text: None)
    rows: list[SweepRow] = []
    for kv_type in types:
        for n in values:
            rows.append(_run_one(engine, n, ctx, kv_type, chosen, max_tokens, temperature))
            step(f"{kv_type} parallel={n}: {rows[-1].throughput:.1f} tok/s")
    settings = {
        "prompts": len(chosen),
        "max_tokens": max_tokens,
        "ctx": ctx,
        "model": engine.model_name,
        "model_path": str(engine.model_path),
    }
    if len(types) == 1:
        recommended, reason = recommend(rows)
        return SweepResult(rows=rows, recommended=recommended, reason=reason, settings=settings)
    quality = kv_quality(
        engine, chosen[:8], kv_types=types, max_tokens=min(max_tokens, 32), ctx=min(ctx, 512), progress=False
    )
    step("quality against f16")
    kv, recommended, reason = recommend_kv(rows, quality)
    return SweepResult(
        rows=rows,
        recommended=recommended,
        reason=reason,
        settings=settings,
        recommended_kv_type=kv,
        quality=quality,
    )


def _kv_types_to_sweep(engine: Engine, kv_types: Sequence[str] | None) -> list[str]:
    """The engine's own type alone, or f16 first and then the others asked for (checked)."""
    if kv_types is None:
        return [engine.kv_type]
    if isinstance(kv_types, str) or not kv_types:
        raise InvalidParamsError(f"kv_types={kv_types!r}: give a list of KV types, e.g. ['f16', 'q8_0']")
    types = ["f16", *dict.fromkeys(t.lower() for t in kv_types if str(t).lower() != "f16")]
    for kv_type in types:
        engine.kv_bytes_per_slot(kv_type)  # checks the name and flash attention before any run
    return types


def _run_one(
    engine: Engine,
    parallel: int,
    ctx: int,
    kv_type: str,
    prompts: list[str],
    max_tokens: int,
    temperature: float,
) -> SweepRow:
    """One (KV type, parallel) point: a fresh context on the same weights, all prompts at once."""
    with engine.spawn(parallel=parallel, ctx=ctx, kv_type=kv_type) as trial:
        trial.generate([prompts[0]], max_tokens=2, temperature=temperature, cache=False)  # warm up
        with _PeakMemory() as peak:
            started = time.perf_counter()
            results = trial.generate(prompts, max_tokens=max_tokens, temperature=temperature, cache=False)
            wall = time.perf_counter() - started
        s = summarize(results, wall)
        return SweepRow(
            parallel=parallel,
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
            kv_type=trial.kv_type,
        )
