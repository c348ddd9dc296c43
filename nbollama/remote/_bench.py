"""The sweep against a server: client concurrency 1, 2, 4, ... 32, and what the server does with it.

A server's parallelism is its own setting (``OLLAMA_NUM_PARALLEL``,
``llama-server -np``, ``vllm serve --max-num-seqs``), so the sweep varies what
the client controls: how many requests are open at once. At each level it
sends the same prompts with that many in flight (like that many users, each
sending the next request when the previous one finished) and measures
aggregate tokens/s and the TTFT each request saw from the moment it was sent.

The server's effective parallelism shows in the first wave of each level:
``c`` requests sent at the same moment. If the server runs ``P < c`` of them at
once, ``P`` get their first token after a prefill, and the rest only after a
running request finished: sorted, the TTFTs step up after the ``P``-th. The
smallest level with such a step gives ``P``.

The recommendation is said in the server's own words.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from .._api.metrics import percentile
from .._api.sweep import DEFAULT_PROMPTS, log_range, mark_on_log_axis, sweep_progress
from ..exceptions import InvalidParamsError
from ._engine import RemoteEngine, RemoteHandle

__all__ = [
    "DEFAULT_CONCURRENCY",
    "ConcurrencyRow",
    "RemoteSweepResult",
    "remote_sweep",
    "find_step",
    "infer_parallel",
    "recommend_setting",
    "server_words",
]

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32)
#: A later first token counts as a step when it is this many times the one before it...
STEP_RATIO = 2.0
#: ...and at least this share of a request's decode time later.
STEP_SHARE = 0.25


@dataclass(frozen=True)
class ConcurrencyRow:
    """One concurrency level: ``concurrency`` requests in flight at once."""

    concurrency: int
    requests: int
    completion_tokens: int
    wall_time: float
    throughput: float  # aggregate completion tokens/s
    ttft_p50: float  # seconds from sending to the first token
    ttft_p95: float
    mean_gen_tps: float  # mean of each request's own tokens/s
    errors: int
    first_wave: tuple[float, ...]  # TTFTs of the first `concurrency` requests (sent together), sorted
    step_after: int | None  # how many of the first wave were served at once, when a step shows


@dataclass
class RemoteSweepResult:
    """The table, the inferred server parallelism and the recommendation of a sweep against a server."""

    rows: list[ConcurrencyRow]
    kind: str
    url: str
    model: str
    inferred_parallel: int | None
    inference: str  # how the parallelism was inferred, in words
    recommended: int
    reason: str
    setting: str  # the recommendation in the server's own words
    server_parallel: int | None  # what the server itself says, when it does
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def recommended_inflight(self) -> int:
        """A client limit that keeps the server full without queueing on it."""
        return self.inferred_parallel or self.recommended

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def to_pandas(self) -> Any:
        import pandas as pd  # here, not at the top: `import nbollama` stays light

        records = self.to_records()
        for record in records:
            record.pop("first_wave")
        return pd.DataFrame(records).set_index("concurrency")

    def figure(self) -> Any:
        """Throughput and TTFT (p50, p95) against client concurrency (plotly)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        xs = [r.concurrency for r in self.rows]
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        fig.add_trace(
            go.Scatter(x=xs, y=[r.throughput for r in self.rows], name="throughput (tok/s)", mode="lines+markers"),
            secondary_y=False,
        )
        fig.add_trace(
            go.Scatter(x=xs, y=[r.ttft_p50 for r in self.rows], name="TTFT p50 (s)", mode="lines+markers", line={"dash": "dot"}),
            secondary_y=True,
        )
        fig.add_trace(
            go.Scatter(x=xs, y=[r.ttft_p95 for r in self.rows], name="TTFT p95 (s)", mode="lines+markers", line={"dash": "dash"}),
            secondary_y=True,
        )
        if self.inferred_parallel is not None:
            mark_on_log_axis(
                fig, self.inferred_parallel, f"server runs {self.inferred_parallel} at once",
                colour="#c62828", xs=xs, dash="dot",
            )
        mark_on_log_axis(fig, self.recommended, f"recommended: {self.recommended}", colour="green", xs=xs)
        fig.update_xaxes(
            title_text="requests in flight (client concurrency)", type="log", tickvals=xs,
            ticktext=[str(x) for x in xs], range=log_range(xs),
        )
        fig.update_yaxes(title_text="tokens/s", rangemode="tozero", secondary_y=False)
        fig.update_yaxes(
            title_text="seconds to first token", rangemode="tozero", showgrid=False, tickmode="auto",
            secondary_y=True,
        )
        fig.update_layout(title=f"{self.kind} at {self.url}: throughput and TTFT against concurrency", height=420)
        return fig

    def _repr_html_(self) -> str:
        import html

        head = "".join(
            f"<th>{h}</th>"
            for h in ("in flight", "tok/s", "vs first", "TTFT p50 s", "TTFT p95 s", "per-request tok/s", "errors")
        )
        base = self.rows[0].throughput if self.rows and self.rows[0].throughput else math.nan
        bold = ' style="font-weight:bold"'
        body = "".join(
            f"<tr{bold if r.concurrency == self.recommended else ''}>"
            f"<td>{r.concurrency}</td><td>{r.throughput:.1f}</td><td>{r.throughput / base:.2f}x</td>"
            f"<td>{r.ttft_p50:.2f}</td><td>{r.ttft_p95:.2f}</td><td>{r.mean_gen_tps:.1f}</td><td>{r.errors}</td></tr>"
            for r in self.rows
        )
        setting = html.escape(self.setting).replace("\n", "<br>")
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p><b>The server runs {self.inferred_parallel if self.inferred_parallel is not None else 'unknown'} "
            f"at once</b>: {html.escape(self.inference)}</p>"
            f"<p><b>Recommendation: {self.recommended}</b>: {html.escape(self.reason)}</p>"
            f'<pre style="background:#f5f5f5;padding:6px">{setting}</pre>'
        )

    def __str__(self) -> str:
        lines = ["in-flight  tok/s  TTFTp50  TTFTp95  req-tok/s  errors"]
        for r in self.rows:
            lines.append(
                f"{r.concurrency:>9}  {r.throughput:5.1f}  {r.ttft_p50:7.2f}  {r.ttft_p95:7.2f}  {r.mean_gen_tps:9.1f}  {r.errors:6}"
            )
        lines.append(f"server parallel (inferred): {self.inferred_parallel} ({self.inference})")
        lines.append(f"recommended: {self.recommended} ({self.reason})")
        lines.append(self.setting)
        return "\n".join(lines)


def find_step(ttfts: Sequence[float], decode_time: float) -> int | None:
    """How many of a wave's sorted TTFTs come before the first big step up, or None without one.

    A step is a first token at least ``STEP_RATIO`` times the previous one and
    ``STEP_SHARE`` of a request's decode time later: the wait for a running
    request to finish, not the noise of a batched prefill.
    """
    values = sorted(t for t in ttfts if t is not None and math.isfinite(t))
    for i in range(1, len(values)):
        before, after = values[i - 1], values[i]
        if after >= STEP_RATIO * max(before, 1e-3) and after - before >= STEP_SHARE * decode_time:
            return i
    return None


def infer_parallel(rows: Sequence[ConcurrencyRow]) -> tuple[int | None, str]:
    """The server's effective parallelism from the first waves' TTFT staircase, and how it was found."""
    for row in sorted(rows, key=lambda r: r.concurrency):
        if row.step_after is not None:
            waits = row.first_wave
            return row.step_after, (
                f"with {row.concurrency} requests sent at once, the first {row.step_after} got their first token "
                f"within {waits[row.step_after - 1]:.2f} s and the next only after {waits[row.step_after]:.2f} s "
                f"(it waited for a running request to finish)"
            )
    top = max((r.concurrency for r in rows), default=0)
    return None, (
        f"no step in the first tokens up to {top} requests at once: the server runs at least {top} at once"
        if top
        else "nothing measured"
    )


def server_words(kind: str, n: int, *, model: str = "", model_path: str = "", ctx: int | None = None) -> str:
    """The setting ``n`` as the server's admin would write it."""
    if kind == "ollama":
        return (
            f"OLLAMA_NUM_PARALLEL={n}\n"
            "# on a systemd install (Ollama's guide):\n"
            "sudo systemctl edit ollama.service\n"
            "#   [Service]\n"
            f'#   Environment="OLLAMA_NUM_PARALLEL={n}"\n'
            "sudo systemctl daemon-reload && sudo systemctl restart ollama\n"
            "# the KV cache grows with OLLAMA_NUM_PARALLEL x the context length"
        )
    if kind == "llama-server":
        total = f" -c {n * ctx}" if ctx else ""
        note = f"  # -c is the total context: {ctx} per slot x {n} slots" if ctx else ""
        return f"llama-server -m {model_path or 'MODEL.gguf'} -np {n}{total}{note}"
    if kind == "vllm":
        return f"vllm serve {model or 'MODEL'} --max-num-seqs {n}"
    return (
        f"# an OpenAI-compatible server has no standard knob: keep {n} requests in flight\n"
        f"%nbollama connect URL --max-inflight {n}"
    )


def recommend_setting(
    rows: Sequence[ConcurrencyRow], inferred: int | None, within: float = 0.9
) -> tuple[int, str]:
    """The parallel setting to give the server, and why.

    If throughput was still climbing when the server stopped taking more
    requests at once (the staircase), the server is short of slots: twice as
    many. Otherwise the smallest concurrency within ``within`` of the best
    throughput: past it, more requests at once only add latency and KV memory.
    """
    ordered = sorted(rows, key=lambda r: r.concurrency)
    best = max(ordered, key=lambda r: r.throughput)
    good = [r for r in ordered if r.throughput >= within * best.throughput]
    knee = min(good, key=lambda r: r.concurrency)
    if inferred is not None:
        at = next((r for r in ordered if r.concurrency == inferred), None)
        below = [r for r in ordered if r.concurrency < inferred]
        if at is not None and below and knee.concurrency >= inferred:
            gain = at.throughput / below[-1].throughput if below[-1].throughput else math.inf
            if gain >= 1.15:
                return 2 * inferred, (
                    f"throughput was still rising when the server ran out of room ({below[-1].concurrency} -> "
                    f"{inferred} in flight gave {gain:.2f}x) and it runs only {inferred} at once: give it {2 * inferred} "
                    "slots, if its memory allows, and sweep again"
                )
        pick = min(knee.concurrency, inferred)
        if pick == inferred:
            return pick, (
                f"the server's {inferred} at once reach {at.throughput / best.throughput:.0%} of the best throughput "
                f"({at.throughput:.1f} vs {best.throughput:.1f} tok/s); more requests only queue on it"
                if at is not None and best.throughput
                else f"the server runs {inferred} at once and more requests only queue on it"
            )
        return pick, (
            f"{pick} in flight reach {knee.throughput / best.throughput:.0%} of the best throughput "
            f"({knee.throughput:.1f} vs {best.throughput:.1f} tok/s at {best.concurrency}); the server's "
            f"{inferred} slots beyond that only add KV memory and latency"
        )
    return knee.concurrency, (
        f"{knee.concurrency} in flight reach {knee.throughput / best.throughput:.0%} of the best throughput "
        f"({knee.throughput:.1f} vs {best.throughput:.1f} tok/s at {best.concurrency}); more only add latency "
        f"(TTFT p95 {knee.ttft_p95:.2f} s vs {best.ttft_p95:.2f} s)"
    )


def _row(concurrency: int, handles: Sequence[RemoteHandle], wall: float) -> ConcurrencyRow:
    results = [h.result() for h in handles]
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in results)
    ttfts = [h.ttft_from_send for h in handles]
    measured = [t for t in ttfts if t is not None]
    speeds = [r.gen_tps for r in ok if r.gen_tps is not None]
    wave = [t for t in ttfts[:concurrency] if t is not None]
    decode = [
        (r.total_time - r.ttft) for r in ok if r.ttft is not None and r.total_time is not None and r.completion_tokens > 1
    ]
    decode_time = percentile(decode, 50) if decode else 0.0
    step = find_step(wave, decode_time) if len(wave) >= 2 and len(wave) == concurrency else None
    return ConcurrencyRow(
        concurrency=concurrency,
        requests=len(results),
        completion_tokens=tokens,
        wall_time=wall,
        throughput=tokens / wall if wall > 0 else math.nan,
        ttft_p50=percentile(measured, 50),
        ttft_p95=percentile(measured, 95),
        mean_gen_tps=sum(speeds) / len(speeds) if speeds else math.nan,
        errors=sum(1 for r in results if r.finish_reason == "error"),
        first_wave=tuple(sorted(wave)),
        step_after=step,
    )


def remote_sweep(
    engine: RemoteEngine,
    *,
    concurrency: Iterable[int] = DEFAULT_CONCURRENCY,
    prompts: Sequence[str] | None = None,
    n_prompts: int = 16,
    max_tokens: int = 64,
    temperature: float = 0.0,
    progress: bool = True,
) -> RemoteSweepResult:
    """Sweep client concurrency against the engine's server; see the module doc.

    Each level sends ``max(n_prompts, concurrency)`` requests with
    ``concurrency`` of them in flight. The engine's in-flight limit is put back
    afterwards.
    """
    levels = sorted({int(c) for c in concurrency})
    if not levels or levels[0] < 1:
        raise InvalidParamsError(f"concurrency values must be whole numbers >= 1, got {list(concurrency)!r}")
    if n_prompts < 1:
        raise InvalidParamsError("n_prompts must be >= 1")
    pool = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    step = sweep_progress(len(levels)) if progress else (lambda text: None)
    before, before_reason = engine.max_inflight, engine.max_inflight_reason
    rows: list[ConcurrencyRow] = []
    try:
        engine.set_max_inflight(1)
        engine.generate([pool[0]], max_tokens=2, temperature=temperature, cache=False)  # warm up
        for level in levels:
            engine.set_max_inflight(level)
            n = max(n_prompts, level)
            chosen = [pool[i % len(pool)] for i in range(n)]
            started = time.perf_counter()
            handles = engine.submit_many(chosen, max_tokens=max_tokens, temperature=temperature, cache=False)
            try:
                for handle in handles:
                    handle.result()
            except BaseException:
                for handle in handles:
                    handle.cancel()
                raise
            wall = time.perf_counter() - started
            row = _row(level, cast("list[RemoteHandle]", handles), wall)  # a RemoteEngine's
            rows.append(row)
            step(f"{level} in flight: {row.throughput:.1f} tok/s, TTFT p50 {row.ttft_p50:.2f} s")
    finally:
        engine.set_max_inflight(before, reason=before_reason)
    inferred, how = infer_parallel(rows)
    recommended, reason = recommend_setting(rows, inferred)
    info = engine.info
    return RemoteSweepResult(
        rows=rows,
        kind=info.kind,
        url=engine.url,
        model=info.model,
        inferred_parallel=inferred,
        inference=how,
        recommended=recommended,
        reason=reason,
        setting=server_words(info.kind, recommended, model=info.model, model_path=info.model_path, ctx=info.ctx),
        server_parallel=info.parallel,
        settings={"prompts": n_prompts, "max_tokens": max_tokens, "temperature": temperature},
    )
