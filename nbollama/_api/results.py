"""What a call or a ``%%generate`` cell hands back: ``Results``, a read-only list of
``Result`` in prompt order, with the views a notebook wants (a compact HTML table,
``.texts``, ``.to_pandas()``)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from ..exceptions import InvalidParamsError
from .requests import Result

if TYPE_CHECKING:
    import pandas

__all__ = ["Results"]

_PREVIEW = 100
#: Above this many results the table shows a summary and the first and last rows, not every row.
COMPACT_ROWS = 20
_EDGE_ROWS = 5
_NOWRAP = 'style="white-space:nowrap"'
_COLUMNS = (
    "id",
    "model",
    "prompt",
    "text",
    "finish_reason",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "ttft",
    "tpot",
    "gen_tps",
    "queue_wait",
    "total_time",
    "slot",
    "cached",  # replayed from the result store
)


def _prompt_index(prompts: list[str], n: int, *, name: str) -> Any:
    """The prompts as an index of ``n`` rows (padded when an engine answered fewer)."""
    import pandas as pd

    return pd.Index(prompts + [""] * (n - len(prompts)), name=name)


def _preview(text: str, limit: int = _PREVIEW) -> str:
    folded = " ".join(text.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"


def _answer(result: Result) -> str:
    """What a row shows: the text, or the choice with its probability over the options."""
    if result.choice is None:
        return result.text
    p = (result.choice_probs or {}).get(result.choice)
    return result.choice if p is None else f"{result.choice} ({p:.0%})"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.0f} ms"


def _tps(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _duration(seconds: float | None) -> str:
    """Milliseconds under a second, seconds above (a summary's long waits stay readable)."""
    if seconds is None:
        return ""
    return _ms(seconds) if seconds < 1 else f"{seconds:.2f} s"


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted ``values``."""
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


_Stat = tuple[str, Callable[[Result], float | None], Callable[[float], str]]
_STATS: tuple[_Stat, ...] = (  # label, how to read it off a result, how to show it
    ("TTFT", lambda r: r.ttft, _duration),
    ("time per token", lambda r: r.tpot, _duration),
    ("tokens", lambda r: r.completion_tokens, lambda v: f"{v:.0f}"),
    ("total time", lambda r: r.total_time, _duration),
)
_PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class _Extra:
    """The columns of what the requests asked beyond text, and each row's values."""

    names: list[str]
    rows: list[dict[str, Any]]


def _fields(parsed: Any) -> Mapping[str, Any] | None:
    """The top-level fields of a parsed output: a dict's items, a pydantic model's ``model_dump()``."""
    if isinstance(parsed, Mapping):
        return parsed
    dump = getattr(parsed, "model_dump", None)
    if callable(dump):
        dumped = dump()
        return dumped if isinstance(dumped, Mapping) else None
    return None


def _output_columns(results: Sequence[Result]) -> _Extra:
    """Columns for choices (``choice``, ``p_<option>``), logprobs (``mean_logprob``,
    ``perplexity``, ``prompt_perplexity``) and formats (the parsed fields, ``parse_error``),
    only for what some request asked."""
    names: list[str] = []
    rows: list[dict[str, Any]] = [{} for _ in results]
    options: dict[str, None] = {}
    for r in results:
        options.update(dict.fromkeys(r.choice_probs or ()))
    if options or any(r.choice is not None for r in results):
        names += ["choice", *(f"p_{o}" for o in options)]
        for row, r in zip(rows, results):
            row["choice"] = r.choice
            for o in options:
                row[f"p_{o}"] = None if r.choice_probs is None else r.choice_probs.get(o)
    if any(r.logprobs is not None for r in results):
        names += ["mean_logprob", "perplexity"]
        for row, r in zip(rows, results):
            row.update(mean_logprob=r.mean_logprob, perplexity=r.perplexity)
    if any(r.prompt_logprobs is not None for r in results):
        names.append("prompt_perplexity")
        for row, r in zip(rows, results):
            row["prompt_perplexity"] = r.prompt_perplexity
    if any(r.parsed is not None or r.parse_error is not None for r in results):
        fields: dict[str, str] = {}  # field -> its column (prefixed where a column has its name)
        taken = {*_COLUMNS, *names, "parse_error", "parsed"}
        for r in results:
            for key in _fields(r.parsed) or ():
                if key not in fields:
                    fields[key] = f"parsed_{key}" if str(key) in taken else str(key)
        others = any(
            r.parsed is not None and not isinstance(r.parsed, str) and _fields(r.parsed) is None
            for r in results
        )
        names += [*fields.values(), *(["parsed"] if others else []), "parse_error"]
        for row, r in zip(rows, results):
            values = _fields(r.parsed) or {}
            for key, column in fields.items():
                row[column] = values.get(key)
            if others:
                row["parsed"] = r.parsed if _fields(r.parsed) is None else None
            row["parse_error"] = r.parse_error
    return _Extra(names, rows)


class Results(Sequence[Result]):
    """The results of one ``%%generate`` cell, in prompt order.

    A read-only list of ``nbollama.Result`` (index it, loop over it, ``len`` it)
    that shows itself as a compact table in a notebook: every row up to
    ``COMPACT_ROWS``, beyond that a summary (finish reasons, percentiles) with
    the first and last rows. ``row_labels`` holds the row labels of the pandas
    Series or DataFrame a cell fanned out with ``--each``, for ``to_pandas``.
    """

    __slots__ = ("_items", "_index")

    def __init__(
        self, results: Iterable[Result] = (), *, index: Iterable[Any] | None = None
    ) -> None:
        self._items: tuple[Result, ...] = tuple(results)
        self._index: tuple[Any, ...] | None = None if index is None else tuple(index)
        if self._index is not None and len(self._index) != len(self._items):
            raise InvalidParamsError(
                f"index has {len(self._index)} labels for {len(self._items)} results"
            )

    @overload
    def __getitem__(self, index: int) -> Result: ...

    @overload
    def __getitem__(self, index: slice) -> Results: ...

    def __getitem__(self, index: int | slice) -> Result | Results:
        if isinstance(index, slice):
            labels = None if self._index is None else self._index[index]
            return Results(self._items[index], index=labels)
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Result]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Results):
            return self._items == other._items
        if isinstance(other, (list, tuple)):
            return list(self._items) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # unhashable: __eq__ compares the contents

    # -- what people use ------------------------------------------------------------

    @property
    def row_labels(self) -> tuple[Any, ...] | None:
        """Each result's row label in the pandas object ``--each`` took its prompt from; None otherwise.

        (``index(result)`` is ``Sequence``'s: the position of a result.)"""
        return self._index

    @property
    def texts(self) -> list[str]:
        """The generated texts, in prompt order."""
        return [r.text for r in self._items]

    @property
    def ok(self) -> bool:
        """True when every request finished normally (``stop`` or ``length``)."""
        return all(r.ok for r in self._items)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all the prompts."""
        return sum(r.completion_tokens for r in self._items)

    def finish_reasons(self) -> dict[str, int]:
        """How many results ended each way (``stop``, ``length``, ``cancelled``, ``error``)."""
        counts: dict[str, int] = {}
        for r in self._items:
            counts[r.finish_reason] = counts.get(r.finish_reason, 0) + 1
        return counts

    def to_pandas(self, join: pandas.DataFrame | None = None) -> pandas.DataFrame:
        """One row per prompt: texts, finish reasons and timings (seconds), ready to plot.

        Requests that asked for more get more columns: ``choice`` and one
        ``p_<option>`` per option (``choices=``); ``mean_logprob`` and
        ``perplexity`` (``logprobs=``), ``prompt_perplexity``
        (``prompt_logprobs=True``); the parsed output's top-level fields
        (``json_schema=``; ``parsed_<name>`` where a column has the name) and
        ``parse_error`` (any format).

        From a cell that ran ``--each`` over a pandas Series or DataFrame, the
        rows carry its index. ``join=frame`` returns ``frame`` with these
        columns added (``_result`` appended to a name it already has): row by
        row when the lengths and labels match, else on the index labels.
        """
        import pandas as pd  # here, not at the top: `import nbollama` stays light

        rows = [{column: getattr(r, column) for column in _COLUMNS} for r in self._items]
        extra = _output_columns(self._items)
        for row, more in zip(rows, extra.rows):
            row.update(more)
        frame = pd.DataFrame(rows, columns=[*_COLUMNS, *extra.names])
        if self._index is not None:
            frame.index = pd.Index(list(self._index))
        if join is None:
            return frame
        if not isinstance(join, pd.DataFrame):
            raise InvalidParamsError(f"join= takes a pandas DataFrame, not {type(join).__name__}")
        same_rows = len(join) == len(frame) and (
            self._index is None or list(join.index) == list(self._index)
        )
        if same_rows:
            joined = join.copy()
            for column in frame.columns:
                name = f"{column}_result" if column in join.columns else column
                joined[name] = frame[column].to_numpy()
            return joined
        if self._index is None:
            raise InvalidParamsError(
                f"join=: the frame has {len(join)} rows and there are {len(frame)} results; "
                "without an index (a cell's --each over a pandas object) they can only be joined row by row"
            )
        return join.merge(
            frame, how="left", left_index=True, right_index=True, suffixes=("", "_result")
        )

    def compare(self, values: str | Sequence[str] = "text") -> pandas.DataFrame:
        """One row per prompt, one column per engine: the results of a ``--models a,b`` cell side by side.

        ``values`` picks the figure in the cells (any ``to_pandas()`` column,
        e.g. ``"gen_tps"``); a list of them gives one column group per figure.
        The n-th result of each engine is the n-th prompt, as a cell sends them.
        """
        frame = self.to_pandas().reset_index(drop=True)
        wanted = [values] if isinstance(values, str) else list(values)
        unknown = [v for v in wanted if v not in frame.columns]
        if unknown or not wanted:
            raise InvalidParamsError(
                f"compare(values={values!r}): {unknown or 'nothing'} not among the columns {list(frame.columns)}"
            )
        models = list(dict.fromkeys(frame["model"]))
        frame["_row"] = frame.groupby("model", sort=False).cumcount()
        side = frame.pivot(index="_row", columns="model", values=wanted)
        side = side.reindex(columns=[(v, m) for v in wanted for m in models])
        if isinstance(values, str):
            side.columns = side.columns.droplevel(0)
        prompts = frame[frame["model"] == models[0]]["prompt"].tolist() if models else []
        side.index = _prompt_index(prompts, len(side), name="prompt")
        side.columns.name = "model" if isinstance(values, str) else side.columns.names[-1]
        return side

    # -- how it shows ---------------------------------------------------------------

    def _summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.finish_reasons().items())
        noun = "result" if len(self._items) == 1 else "results"
        replayed = sum(1 for r in self._items if r.cached)
        return (
            f"{len(self._items)} {noun}, {self.completion_tokens} tokens"
            + (f" ({reasons})" if reasons else "")
            + (f", {replayed} replayed from the store" if replayed else "")
        )

    def _stats(self) -> list[tuple[str, list[str]]]:
        """Per figure: p50, p90, p99 and max over the results that have it (replayed ones carry
        another run's timings: they are left out)."""
        out = []
        ran = [r for r in self._items if not r.cached]
        for label, read, show in _STATS:
            values = sorted(v for v in (read(r) for r in ran) if v is not None)
            if values:
                out.append(
                    (
                        label,
                        [show(_percentile(values, p)) for p in _PERCENTILES] + [show(values[-1])],
                    )
                )
        return out

    def _shown_rows(self) -> list[int | None]:
        """Row numbers to show; None stands for the rows left out in the middle."""
        n = len(self._items)
        if n <= COMPACT_ROWS:
            return list(range(n))
        return [*range(_EDGE_ROWS), None, *range(n - _EDGE_ROWS, n)]

    def __repr__(self) -> str:
        several = len({r.model for r in self._items}) > 1
        lines = [f"Results: {self._summary()}"]
        if len(self._items) > COMPACT_ROWS:
            for label, figures in self._stats():
                lines.append(
                    f"  {label}: "
                    + ", ".join(f"p{p} {v}" for p, v in zip(_PERCENTILES, figures))
                    + f", max {figures[-1]}"
                )
        for i in self._shown_rows():
            if i is None:
                lines.append(
                    f"... {len(self._items) - 2 * _EDGE_ROWS} more (.to_pandas() has them all)"
                )
                continue
            r = self._items[i]
            shown = r.error if r.finish_reason == "error" and r.error else _answer(r)
            who = f"{r.model}: " if several else ""
            lines.append(
                f"[{i}] {who}{r.finish_reason:<9} {r.completion_tokens:>5} tok  {_preview(shown, 72)!r}"
            )
        return "\n".join(lines)

    def _stats_html(self) -> str:
        head = "".join(
            f'<th style="text-align:right">{h}</th>'
            for h in (*(f"p{p}" for p in _PERCENTILES), "max")
        )
        rows = "".join(
            f'<tr><th style="text-align:left;white-space:nowrap">{label}</th>'
            + "".join(f'<td style="text-align:right;white-space:nowrap">{v}</td>' for v in figures)
            + "</tr>"
            for label, figures in self._stats()
        )
        return (
            '<table class="nbollama-results-stats">'
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>"
        )

    def _repr_html_(self) -> str:
        several = len({r.model for r in self._items}) > 1  # a --models cell: say which engine answered
        head = "".join(
            f'<th style="text-align:left;white-space:nowrap">{name}</th>'
            for name in ("#", *(("model",) if several else ()), "slot", "finish", "tokens", "TTFT", "tok/s", "text")
        )
        rows = []
        for i in self._shown_rows():
            if i is None:
                left_out = len(self._items) - 2 * _EDGE_ROWS
                rows.append(
                    f'<tr><td colspan="{8 if several else 7}" style="text-align:left">… {left_out} more rows '
                    "(<code>.to_pandas()</code> has them all)</td></tr>"
                )
                continue
            r = self._items[i]
            if r.finish_reason == "error" and r.error:
                text = f'<span style="color:#c62828">{html.escape(_preview(r.error))}</span>'
            else:
                text = html.escape(_preview(_answer(r)))
            rows.append(
                "<tr>"
                f"<td {_NOWRAP}>{i}</td>"
                + (f"<td {_NOWRAP}>{html.escape(r.model)}</td>" if several else "")
                + f"<td {_NOWRAP}>{'' if r.slot is None else r.slot}</td>"
                f"<td {_NOWRAP}>{r.finish_reason}</td><td {_NOWRAP}>{r.completion_tokens}</td>"
                f"<td {_NOWRAP}>{_ms(r.ttft)}</td><td {_NOWRAP}>{_tps(r.gen_tps)}</td>"
                f'<td style="text-align:left">{text}</td>'
                "</tr>"
            )
        table = (
            '<table class="nbollama-results">'
            f'<caption style="text-align:left">Results: {html.escape(self._summary())}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
        if len(self._items) <= COMPACT_ROWS:
            return table
        return f'<div class="nbollama-results-summary">{table}{self._stats_html()}</div>'
