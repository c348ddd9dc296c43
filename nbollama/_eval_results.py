"""What an evaluation gives back: lm-eval's metrics as a table, each question as a row, a calibration plot.

``EvalResults`` holds lm-eval's own result dicts, one per engine evaluated
(``%nbollama eval --engine a,b`` compares engines in one table), and reads
from them; it imports nothing of lm-eval, so a kernel without the ``eval``
extra can still open a saved one.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["EvalResults"]

#: Keys of a task's lm-eval results that are not metrics
_NOT_METRICS = frozenset({"alias", "name", "sample_len", "group", " "})


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _metric_rows(engine: str, out: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    samples = out.get("n-samples") or {}
    for task, metrics in (out.get("results") or {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in _NOT_METRICS or metric.endswith("_stderr") or not filt:
                continue
            n = (samples.get(task) or {}).get("effective")
            rows.append(
                {
                    "engine": engine,
                    "task": task,
                    "metric": metric if filt == "none" else f"{metric} ({filt})",
                    "value": _number(value),
                    "stderr": _number(metrics.get(f"{metric}_stderr,{filt}")),
                    "n": n,
                }
            )
    return rows


def _softmax(values: Sequence[float]) -> list[float]:
    peak = max(values)
    weights = [math.exp(v - peak) for v in values]
    total = math.fsum(weights)
    return [w / total for w in weights]


def _gold_index(target: Any, options: Sequence[str]) -> int | None:
    if isinstance(target, list) and target:
        target = target[0]
    if isinstance(target, bool):
        return None
    if isinstance(target, int):
        return target
    if isinstance(target, str):
        stripped = [o.strip() for o in options]
        if target.strip() in stripped:
            return stripped.index(target.strip())
        if target.strip().isdigit():
            return int(target.strip())
    return None


def _sample_row(engine: str, task: str, sample: Mapping[str, Any]) -> dict[str, Any]:
    args = list(sample.get("arguments") or [])
    resps = list(sample.get("filtered_resps") or [])
    row: dict[str, Any] = {"engine": engine, "task": task, "doc_id": sample.get("doc_id")}
    first: Sequence[Any] = args[0] if args else ()
    row["prompt"] = first[0] if first else None
    scored = resps and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in resps)
    if len(args) > 1 and scored:  # multiple choice: one (context, option) per option
        options = [a[1].strip() for a in args]
        logprobs = [float(r[0]) for r in resps]
        probs = _softmax(logprobs)
        pick = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
        gold = _gold_index(sample.get("target"), [a[1] for a in args])
        row.update(
            options=options,
            logprobs=logprobs,
            probs=probs,
            pick=options[pick],
            gold=options[gold] if gold is not None and 0 <= gold < len(options) else None,
            correct=(pick == gold) if gold is not None else None,
            confidence=probs[pick],
        )
    elif len(first) == 2 and isinstance(first[1], Mapping):  # a generation
        row.update(response=resps[0] if resps else None, target=sample.get("target"))
        for metric in sample.get("metrics") or ():
            if metric in sample:
                row[metric] = sample[metric]
    elif resps:  # a rolling log-likelihood, or one continuation's
        head = resps[0]
        row["logprob"] = float(head[0] if isinstance(head, (tuple, list)) else head)
        row["prompt"] = first[0] if first else None
    return row


class EvalResults:
    """lm-eval's results on one or several engines.

    ``table``: one row per engine, task and metric (value, stderr, n). ``samples``: one row
    per question (multiple choice: the options, their log-likelihoods and probabilities,
    the pick, the gold answer, whether it is right and how sure; generation: the response
    and target). ``calibration()``: confidence against accuracy. ``raw[engine]``: lm-eval's
    own dict. ``log``: what lm-eval printed and logged meanwhile.
    """

    def __init__(
        self,
        runs: Mapping[str, Mapping[str, Any]],
        *,
        seconds: Mapping[str, float] | None = None,
        requests: Mapping[str, int] | None = None,
        log: str = "",
    ) -> None:
        self.raw: dict[str, Mapping[str, Any]] = dict(runs)
        self.seconds = dict(seconds or {})
        self.requests = dict(requests or {})
        self.log = log

    @classmethod
    def merge(cls, parts: Sequence[EvalResults]) -> EvalResults:
        """Several engines' results as one (``--engine a,b``)."""
        merged = cls({})
        for part in parts:
            merged.raw.update(part.raw)
            merged.seconds.update(part.seconds)
            merged.requests.update(part.requests)
            merged.log += part.log
        return merged

    @property
    def engines(self) -> list[str]:
        return list(self.raw)

    @property
    def table(self) -> Any:
        """A DataFrame: engine, task, metric, value, stderr, n."""
        import pandas as pd

        rows = [row for engine, out in self.raw.items() for row in _metric_rows(engine, out)]
        return pd.DataFrame(rows, columns=["engine", "task", "metric", "value", "stderr", "n"])

    @property
    def samples(self) -> Any:
        """A DataFrame, one row per question of every task and engine."""
        import pandas as pd

        rows = [
            _sample_row(engine, task, sample)
            for engine, out in self.raw.items()
            for task, samples in (out.get("samples") or {}).items()
            for sample in samples
        ]
        return pd.DataFrame(rows)

    def metric(self, task: str, metric: str, engine: str | None = None) -> tuple[float, float]:
        """(value, stderr) of one metric (the first engine's unless named)."""
        table = self.table
        engine = engine or self.engines[0]
        row = table[(table.engine == engine) & (table.task == task) & (table.metric == metric)]
        if row.empty:
            raise KeyError(f"no {metric!r} for task {task!r} on engine {engine!r}")
        return float(row.value.iloc[0]), float(row.stderr.iloc[0])

    def compare(self) -> Any:
        """The metrics side by side: a row per task and metric, "value" and "± stderr" per engine."""
        table = self.table
        wide = table.pivot_table(
            index=["task", "metric"], columns="engine", values=["value", "stderr"], sort=False
        )
        wide = wide.reindex(columns=self.engines, level=1)
        return wide

    def calibration(self, bins: int = 10) -> Any:
        """A plotly figure: for multiple-choice questions, the accuracy at each confidence (the
        pick's probability over the options), per engine; the diagonal is perfect calibration."""
        import plotly.graph_objects as go

        frame = self.samples
        figure = go.Figure()
        figure.add_trace(
            go.Scatter(
                x=[0, 1],
                y=[0, 1],
                mode="lines",
                name="calibrated",
                line={"dash": "dot", "color": "#999"},
            )
        )
        if "confidence" in frame:
            mc = frame[frame["confidence"].notna() & frame["correct"].notna()]
            for engine, rows in mc.groupby("engine", sort=False):
                edges = [i / bins for i in range(bins + 1)]
                xs, ys, ns = [], [], []
                for lo, hi in zip(edges, edges[1:]):
                    inside = rows[(rows.confidence >= lo) & ((rows.confidence < hi) | (hi == 1.0))]
                    if len(inside):
                        xs.append(float(inside.confidence.mean()))
                        ys.append(float(inside.correct.astype(float).mean()))
                        ns.append(len(inside))
                figure.add_trace(
                    go.Scatter(
                        x=xs,
                        y=ys,
                        mode="lines+markers",
                        name=str(engine),
                        marker={"size": [6 + 14 * n / max(ns) for n in ns]},
                        text=[f"{n} questions" for n in ns],
                        hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{text}<extra></extra>",
                    )
                )
        figure.update_layout(
            title="Calibration: accuracy at each confidence (multiple choice)",
            xaxis={
                "title": "confidence (probability of the pick over the options)",
                "range": [0, 1],
            },
            yaxis={"title": "accuracy", "range": [0, 1]},
            template="plotly_white",
            height=420,
        )
        return figure

    # -- display ---------------------------------------------------------------------------------------

    def _speed(self) -> list[str]:
        lines = []
        for engine in self.engines:
            seconds, n = self.seconds.get(engine), self.requests.get(engine)
            if seconds:
                rate = f", {n / seconds:.1f} requests/s" if n else ""
                lines.append(f"{engine}: {n or 0} requests in {seconds:.1f} s{rate}")
        return lines

    def _cells(self) -> tuple[list[str], list[tuple[str, str, list[str]]]]:
        """(the engines, then per task and metric: "value ± stderr" per engine)."""
        table = self.table
        order: dict[tuple[str, str], dict[str, str]] = {}
        for row in table.itertuples():
            shown = f"{row.value:.4f}" + ("" if math.isnan(row.stderr) else f" ± {row.stderr:.4f}")
            order.setdefault((row.task, row.metric), {})[row.engine] = shown
        return self.engines, [
            (t, m, [v.get(e, "") for e in self.engines]) for (t, m), v in order.items()
        ]

    def _repr_html_(self) -> str:
        engines, rows = self._cells()
        cell = 'style="text-align:left;padding:2px 10px 2px 0"'
        num = 'style="text-align:right;padding:2px 10px 2px 0;font-variant-numeric:tabular-nums"'
        head = "".join(f"<th {num}>{html.escape(e)}</th>" for e in engines)
        body = "".join(
            f"<tr><td {cell}>{html.escape(t)}</td><td {cell}>{html.escape(m)}</td>"
            + "".join(f"<td {num}>{html.escape(v)}</td>" for v in values)
            + "</tr>"
            for t, m, values in rows
        )
        speed = "".join(f"<div>{html.escape(line)}</div>" for line in self._speed())
        return (
            '<div class="nbollama-eval-results" style="font-size:12px">'
            f"<table><thead><tr><th {cell}>task</th><th {cell}>metric</th>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>"
            f'<div style="color:var(--jp-ui-font-color2,#666);margin-top:4px">{speed}'
            "<code>.samples</code>: one row per question · <code>.calibration()</code>: the plot</div></div>"
        )

    def __repr__(self) -> str:
        engines, rows = self._cells()
        lines = ["task | metric | " + " | ".join(engines)]
        lines += [f"{t} | {m} | " + " | ".join(values) for t, m, values in rows]
        return "\n".join(lines + self._speed())
