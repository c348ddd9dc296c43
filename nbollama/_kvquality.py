"""What a KV-cache type costs in quality, measured on the user's own model and prompts.

Three figures per type, each against f16 on the same inputs:
- greedy agreement: the prompts whose greedy text is the same, generated in
  reproducible mode so that only the cache's precision differs;
- the mean KL divergence of the next-token distribution over the first
  generated positions, f16's continuation fed to both (teacher forcing, as
  llama.cpp's ``perplexity --kl-divergence`` does), over the whole vocabulary;
- the perplexity of a reference text.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import memory as _memory
from ._api.kvcache import KV_TYPES
from ._api.sweep import DEFAULT_PROMPTS, sweep_progress
from ._core._engine import Engine
from ._core._kvprobe import Scorer
from .exceptions import InvalidParamsError

__all__ = ["KVQualityRow", "KVQualityResult", "REFERENCE_TEXT", "kv_quality"]

#: The default text whose perplexity each type is scored on (written for nbollama).
REFERENCE_TEXT = (
    "A library keeps its books on open shelves, and readers take them down, read a few pages, and put "
    "them back. Some books are asked for every day, so the librarians keep a second copy near the desk. "
    "When the shelves fill up, the least read books move to a store room, where they can still be "
    "fetched, only more slowly. Every year the library counts how often each book was opened, and the "
    "count decides what stays near the door. Visitors rarely notice any of this. They notice only that "
    "the book they wanted was there when they reached for it, and that the reading room stayed quiet "
    "even on the busiest afternoons of the examination season."
)


@dataclass(frozen=True)
class KVQualityRow:
    """One KV type against f16."""

    kv_type: str
    kv_bytes_per_slot: int  # at the measurement's ctx, as llama.cpp allocates it
    kv_ratio: float  # bytes per slot / f16's
    greedy_agreement: float  # share of prompts whose greedy text equals f16's
    mean_kl: float  # nats, over the first generated positions
    max_kl: float
    top1_agreement: float  # share of those positions whose most likely token is f16's
    perplexity: float  # of the reference text
    perplexity_delta: float  # minus f16's


@dataclass
class KVQualityResult:
    """The quality table of ``kv_quality``, with a figure."""

    rows: list[KVQualityRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, kv_type: str) -> KVQualityRow:
        for r in self.rows:
            if r.kv_type == kv_type:
                return r
        raise KeyError(kv_type)

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.to_records()).set_index("kv_type")

    def figure(self) -> Any:
        """KV bytes per slot against mean KL, one point per type (plotly)."""
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Scatter(
                x=[r.kv_bytes_per_slot / 2**20 for r in self.rows],
                y=[r.mean_kl for r in self.rows],
                text=[r.kv_type for r in self.rows],
                mode="markers+text",
                textposition="top center",
                marker={"size": 12},
                hovertemplate="%{text}: %{x:.1f} MiB per slot, mean KL %{y:.4f} nats<extra></extra>",
            )
        )
        fig.update_layout(
            title="Smaller KV cache, and what it costs: KL divergence from f16",
            xaxis_title=f"KV MiB per slot (ctx {self.settings.get('ctx', '?')})",
            yaxis_title="mean KL vs f16 (nats)",
            height=380,
        )
        return fig

    def _repr_html_(self) -> str:
        head = "".join(
            f"<th>{h}</th>"
            for h in ("KV type", "KV per slot", "vs f16", "greedy texts same", "mean KL", "max KL", "top-1 same", "perplexity")
        )
        body = "".join(
            f"<tr><td>{r.kv_type}</td><td>{_memory.format_bytes(r.kv_bytes_per_slot)}</td>"
            f"<td>{r.kv_ratio:.2f}x</td><td>{r.greedy_agreement:.0%}</td><td>{r.mean_kl:.5f}</td>"
            f"<td>{r.max_kl:.4f}</td><td>{r.top1_agreement:.1%}</td>"
            f"<td>{r.perplexity:.3f} ({r.perplexity_delta:+.3f})</td></tr>"
            for r in self.rows
        )
        s = self.settings
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p>{s.get('prompts')} prompts, {s.get('positions')} generated positions each, "
            f"against f16 on {s.get('model')}; KL in nats over the whole vocabulary</p>"
        )

    def __str__(self) -> str:
        lines = ["kv_type  per-slot    ratio  greedy-same  mean-KL   top1-same  ppl (delta)"]
        for r in self.rows:
            lines.append(
                f"{r.kv_type:<7}  {_memory.format_bytes(r.kv_bytes_per_slot):>9}  {r.kv_ratio:5.2f}x  "
                f"{r.greedy_agreement:11.0%}  {r.mean_kl:8.5f}  {r.top1_agreement:9.1%}  "
                f"{r.perplexity:.3f} ({r.perplexity_delta:+.3f})"
            )
        return "\n".join(lines)


def _engine_for(engine_or_model: Engine | str | os.PathLike[str] | None, ctx: int) -> tuple[Engine, bool]:
    """The engine to measure on, and whether this call loaded it (and so closes it)."""
    if isinstance(engine_or_model, Engine):
        return engine_or_model, False
    if engine_or_model is None:
        from .session import current_engine

        current = current_engine()
        if isinstance(current, Engine):
            return current, False
        if current is not None:
            raise InvalidParamsError(
                "the kernel's engine is a server: its KV cache type is set where it starts; "
                "pass kv_quality an in-kernel Engine or a model path"
            )
    if not isinstance(engine_or_model, (str, os.PathLike, type(None))):
        raise InvalidParamsError(
            f"kv_quality measures an in-kernel Engine or a model path, not {type(engine_or_model).__name__}"
        )
    return Engine.load(engine_or_model, parallel=1, ctx=ctx), True


def kv_quality(
    engine_or_model: Engine | str | os.PathLike[str] | None = None,
    prompts: Sequence[str] | None = None,
    *,
    kv_types: Sequence[str] = ("f16", "q8_0", "q4_0"),
    max_tokens: int = 32,
    reference_text: str | None = None,
    ctx: int = 512,
    progress: bool = True,
) -> KVQualityResult:
    """Each KV type's quality against f16 on these prompts (see the module doc); f16 is always measured."""
    wanted = ["f16", *(t.lower() for t in kv_types if t.lower() != "f16")]
    bad = [t for t in wanted if t not in KV_TYPES]
    if bad:
        raise InvalidParamsError(f"kv_types {bad}: each must be one of {', '.join(KV_TYPES)}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidParamsError(f"max_tokens={max_tokens!r}: must be a whole number >= 1")
    chosen = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS[:8])
    if not chosen or not all(isinstance(p, str) and p for p in chosen):
        raise InvalidParamsError("prompts must be a non-empty list of non-empty strings")
    engine, owned = _engine_for(engine_or_model, ctx)
    step = sweep_progress(len(wanted) + 1) if progress else (lambda text: None)
    try:
        texts: dict[str, list[str]] = {}
        continuations: list[list[int]] = []
        for kv_type in wanted:
            with engine.spawn(
                parallel=min(8, len(chosen)), ctx=ctx, kv_type=kv_type, reproducible=True
            ) as trial:
                results = trial.generate(chosen, max_tokens=max_tokens, temperature=0.0, cache=False)
            texts[kv_type] = [r.text for r in results]
            if kv_type == "f16":
                continuations = [list(r.token_ids) for r in results]
            step(f"{kv_type}: greedy texts")
        kl, top1, ppl = _score(engine, wanted, chosen, continuations, reference_text or REFERENCE_TEXT, ctx)
        step("KL divergence and perplexity")
        per_slot = {t: engine.kv_bytes_per_slot(t, ctx=ctx) for t in wanted}
        rows = [
            KVQualityRow(
                kv_type=t,
                kv_bytes_per_slot=per_slot[t],
                kv_ratio=per_slot[t] / per_slot["f16"],
                greedy_agreement=float(np.mean([a == b for a, b in zip(texts[t], texts["f16"])])),
                mean_kl=float(np.mean(kl[t])) if kl[t] else math.nan,
                max_kl=float(np.max(kl[t])) if kl[t] else math.nan,
                top1_agreement=float(np.mean(top1[t])) if top1[t] else math.nan,
                perplexity=ppl[t],
                perplexity_delta=ppl[t] - ppl["f16"],
            )
            for t in wanted
        ]
        return KVQualityResult(
            rows,
            settings={
                "prompts": len(chosen),
                "positions": max_tokens,
                "ctx": ctx,
                "model": engine.model_name,
            },
        )
    finally:
        if owned:
            engine.close()


def _score(
    engine: Engine,
    kv_types: Sequence[str],
    prompts: Sequence[str],
    continuations: Sequence[list[int]],
    reference_text: str,
    ctx: int,
) -> tuple[dict[str, list[float]], dict[str, list[bool]], dict[str, float]]:
    """Per-position KL and top-1 agreement against f16, and each type's reference perplexity."""
    reference = engine.tokenize(reference_text)[:ctx]
    if len(reference) < 2:
        raise InvalidParamsError("reference_text must be at least 2 tokens")
    scorers: dict[str, Scorer] = {}
    try:
        for t in kv_types:
            scorers[t] = engine.scorer(t, ctx=ctx)
        kl: dict[str, list[float]] = {t: [] for t in kv_types}
        top1: dict[str, list[bool]] = {t: [] for t in kv_types}
        for prompt, generated in zip(prompts, continuations):
            prompt_ids = engine.tokenize(prompt)
            sequence = (prompt_ids + generated)[:ctx]
            rows_from = len(prompt_ids) - 1  # the row that predicts the first generated token
            if not generated or len(sequence) <= rows_from + 1:
                continue
            base = scorers["f16"].score(sequence, rows_from).rows
            p = np.exp(base.astype(np.float64))
            for t in kv_types:
                rows = base if t == "f16" else scorers[t].score(sequence, rows_from).rows
                kl[t].extend((p * (base - rows)).sum(axis=1).tolist())
                top1[t].extend((rows.argmax(axis=1) == base.argmax(axis=1)).tolist())
        ppl = {
            t: float(math.exp(-scorers[t].score(reference).token_logprobs.mean())) for t in kv_types
        }
        return kl, top1, ppl
    finally:
        for scorer in scorers.values():
            scorer.close()
