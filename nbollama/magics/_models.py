"""``%nbollama models``: the GGUF models on this machine, as a table (text, or HTML in a notebook)."""

from __future__ import annotations

import html
from collections.abc import Iterable

from ..memory import format_bytes
from ..sources import ModelEntry, find_models

__all__ = ["ModelsListing", "models_listing", "format_models_table", "models_html"]


def models_listing(folders: tuple[str, ...]) -> ModelsListing:
    """``%nbollama models``: what ``nbollama.sources.find_models`` finds, as a table."""
    return ModelsListing(find_models(folders))


class ModelsListing:
    """The models found: plain text in a terminal, an HTML table in a notebook; ``entries`` holds them."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self.entries = entries

    def __repr__(self) -> str:
        return format_models_table(self.entries)

    def _repr_html_(self) -> str:
        return models_html(self.entries)


_COLUMNS = ("NAME", "SIZE", "QUANT", "ARCH", "SOURCE", "WHERE")


def _cells(entry: ModelEntry) -> tuple[str, ...]:
    return (
        entry.name,
        format_bytes(entry.size) if entry.size else "-",
        entry.quantisation or "-",
        entry.architecture or "-",
        entry.source,
        entry.where,
    )


def format_models_table(entries: Iterable[ModelEntry]) -> str:
    """Plain text, columns aligned like ``ollama list``; problems listed under the table."""
    entries = list(entries)
    if not entries:
        return "no GGUF models found"
    rows = [_COLUMNS, *(_cells(e) for e in entries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"! {e.name}: {e.problem}" for e in entries if e.problem]
    return "\n".join(lines)


def models_html(entries: Iterable[ModelEntry]) -> str:
    """A small HTML table of the same columns; a broken entry shows its problem in its row."""
    entries = list(entries)
    if not entries:
        return "<p>no GGUF models found</p>"
    head = "".join(f"<th style='text-align:left'>{c}</th>" for c in _COLUMNS)
    rows = []
    for entry in entries:
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in _cells(entry))
        rows.append(f"<tr title='{html.escape(str(entry.path), quote=True)}'>{cells}</tr>")
        if entry.problem:
            note = html.escape(entry.problem)
            rows.append(f"<tr><td colspan='{len(_COLUMNS)}' style='color:#b00'>⚠ {note}</td></tr>")
    return f"<table class='nbollama-models'><tr>{head}</tr>{''.join(rows)}</table>"
