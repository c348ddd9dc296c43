"""The memory panel: where the bytes went, and why the KV cache is the size it is.

With a GPU it shows VRAM per device from NVML and this process's share of
it; without one, this process's RSS (and PSS, which counts the mmapped model
file once however many processes share it) and the RAM still available.
Either way it shows the KV cache and the ``parallel x ctx/slot`` sum behind
it: the number one surprise when people raise ``parallel``.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
from traitlets import Bool, Dict, Int, List, Unicode

from .._api.protocol import EngineLike
from .._api.snapshot import EngineSnapshot, KVSnapshot, MemoryFigures, RemoteFigures
from ..memory import format_bytes
from ._live import DEFAULT_INTERVAL, LiveView

__all__ = ["MemoryPanel", "memory_html", "memory_summary"]


def _bar(
    used: int, total: int, colour: str, part: int | None = None, part_colour: str = "#1565c0"
) -> str:
    """A horizontal bar: ``used`` of ``total``, with ``part`` of ``used`` in a darker shade."""
    if total <= 0:
        return ""
    used_pct = max(0.0, min(100.0, 100.0 * used / total))
    inner = ""
    if part is not None and used > 0:
        part_pct = max(0.0, min(100.0, 100.0 * part / used))
        inner = f'<div style="width:{part_pct:.1f}%;height:100%;background:{part_colour}"></div>'
    return (
        '<div style="width:100%;height:8px;background:#e0e0e0;border-radius:4px;overflow:hidden">'
        f'<div style="width:{used_pct:.1f}%;height:100%;background:{colour};display:flex">{inner}</div></div>'
    )


def _row(label: str, value: str) -> str:
    return (
        f'<tr><td style="padding:1px 8px 1px 0;color:#616161;white-space:nowrap">{label}</td>'
        f'<td style="padding:1px 0;font-family:monospace">{value}</td></tr>'
    )


def _known_bytes(value: int | None) -> str:
    return "unknown" if value is None else format_bytes(value)


def _remote_memory_html(
    figures: MemoryFigures, remote: RemoteFigures | None, kv: KVSnapshot | None
) -> str:
    """A server's memory: what it reports (Ollama's models, vLLM's KV use), this machine's GPUs
    only when the server runs here, and "unknown" for the rest."""
    parts: list[str] = ['<div class="nbollama-memory nbollama-memory-remote" style="font-size:12px;line-height:1.5">']
    for gpu in figures["gpus"]:
        title = f"GPU {gpu['index']} · {html.escape(gpu['name'])} · this machine (the server's host)"
        parts.append(
            f'<div class="nbollama-gpu" style="margin-bottom:4px"><b>{title}</b><br>'
            f'<span style="font-family:monospace">{format_bytes(gpu["used"])} / {format_bytes(gpu["total"])} used · '
            f'{format_bytes(gpu["free"])} free</span><br>{_bar(gpu["used"], gpu["total"], "#90caf9")}</div>'
        )
    rows: list[str] = []
    for model in (remote or {}).get("models", []) if remote else []:
        share = ""
        if model["size"] and model["size_vram"] is not None:
            share = f" ({model['size_vram'] / model['size']:.0%} on GPU)"
        rows.append(
            _row(
                html.escape(model["name"]),
                f"{_known_bytes(model['size'])}, VRAM {_known_bytes(model['size_vram'])}{share}"
                + (f", context {model['context_length']}" if model["context_length"] is not None else ""),
            )
        )
    if remote is not None and remote["kv_usage"] is not None:
        total = kv["total"] if kv is not None else None
        rows.append(
            _row("server KV cache", f"{remote['kv_usage']:.0%} in use" + (f" of {total} tokens" if total else ""))
        )
    elif kv is not None and kv["total"] is not None:
        rows.append(_row("server KV cache", f"{kv['total']} tokens (slots x ctx/slot); bytes unknown"))
    else:
        rows.append(_row("KV cache", "unknown (the server does not say)"))
    parts.append(f'<table style="border-collapse:collapse;margin-top:4px">{"".join(rows)}</table>')
    parts.append(
        f'<div class="nbollama-memory-note" style="color:#9e9e9e;font-size:11px">{html.escape(figures["note"])}</div>'
    )
    parts.append("</div>")
    return "".join(parts)


def memory_html(
    figures: MemoryFigures, remote: RemoteFigures | None = None, kv: KVSnapshot | None = None
) -> str:
    """The panel's body for one set of figures (plain HTML, so it also works in a static render)."""
    if figures["source"] == "remote":
        return _remote_memory_html(figures, remote, kv)
    parts: list[str] = ['<div class="nbollama-memory" style="font-size:12px;line-height:1.5">']
    if figures["source"] == "nvml" and figures["gpus"]:
        for gpu in figures["gpus"]:
            title = f"GPU {gpu['index']} · {html.escape(gpu['name'])}"
            used = f"{format_bytes(gpu['used'])} / {format_bytes(gpu['total'])} used"
            if gpu["process_used"] is None:
                mine = "this process: not reported by the driver"
            else:
                mine = f"this process: {format_bytes(gpu['process_used'])}"
            parts.append(
                f'<div class="nbollama-gpu" style="margin-bottom:4px"><b>{title}</b><br>'
                f'<span style="font-family:monospace">{used} · {format_bytes(gpu["free"])} free</span><br>'
                f"{_bar(gpu['used'], gpu['total'], '#90caf9', gpu['process_used'])}"
                f'<span style="font-family:monospace">{mine}</span></div>'
            )
        rows = [_row("process RSS", format_bytes(figures["process_rss"]))]
    else:
        rows = [_row("process RSS", format_bytes(figures["process_rss"]))]
        if figures["process_pss"] is not None:
            rows.append(_row("process PSS", format_bytes(figures["process_pss"])))
        rows.append(
            _row(
                "RAM available",
                f"{format_bytes(figures['host_available'])} of {format_bytes(figures['host_total'])}",
            )
        )
        total, available = figures["host_total"], figures["host_available"]
        if total is not None and available is not None:  # None only in a remote engine's figures
            in_use = total - available
            parts.append(_bar(in_use, total, "#a5d6a7", figures["process_rss"], "#2e7d32"))
    kv_type = figures.get("kv_type") or ""
    rows.append(_row("KV cache", format_bytes(figures["kv_bytes"]) + (f" ({html.escape(kv_type)})" if kv_type else "")))
    parts.append(f'<table style="border-collapse:collapse;margin-top:4px">{"".join(rows)}</table>')
    if figures["kv_estimate"]:
        parts.append(
            '<div class="nbollama-kv-estimate" style="color:#424242">'
            f"KV = parallel x ctx/slot: {html.escape(figures['kv_estimate'])}</div>"
        )
    parts.append(
        f'<div class="nbollama-memory-note" style="color:#9e9e9e;font-size:11px">{html.escape(figures["note"])}</div>'
    )
    parts.append("</div>")
    return "".join(parts)


def memory_summary(figures: MemoryFigures) -> str:
    """One line for the compact dashboard: VRAM (or RSS/PSS) and the KV cache."""
    if figures["source"] == "remote":
        used = sum(g["used"] for g in figures["gpus"])
        total = sum(g["total"] for g in figures["gpus"])
        text = f"VRAM here {format_bytes(used)}/{format_bytes(total)}" if figures["gpus"] else "server memory unknown"
        return f"{text} · KV {_known_bytes(figures['kv_bytes'])}"
    if figures["source"] == "nvml" and figures["gpus"]:
        used = sum(g["used"] for g in figures["gpus"])
        total = sum(g["total"] for g in figures["gpus"])
        mine = [g["process_used"] for g in figures["gpus"] if g["process_used"] is not None]
        text = f"VRAM {format_bytes(used)}/{format_bytes(total)}"
        if mine:
            text += f" (this process {format_bytes(sum(mine))})"
    else:
        text = f"RSS {format_bytes(figures['process_rss'])}"
        if figures["process_pss"] is not None:
            text += f" (PSS {format_bytes(figures['process_pss'])})"
    kv_type = figures.get("kv_type") or ""
    return f"{text} · KV {format_bytes(figures['kv_bytes'])}" + (f" {kv_type}" if kv_type else "")


class MemoryPanel(LiveView, widgets.VBox):
    """Memory figures of the engine's process: VRAM per GPU, or RSS/PSS; always the KV cache.

    The figures are traitlets (bytes); ``show(figures)`` renders any
    ``MemoryFigures`` (the snapshot's ``memory``), ``update(snapshot)`` a snapshot.
    """

    source = Unicode("host")  # "nvml", "host", or "remote" (a server's memory: figures may be None)
    process_rss = Int(0, allow_none=True)
    process_pss = Int(None, allow_none=True)
    host_total = Int(0, allow_none=True)
    host_available = Int(0, allow_none=True)
    gpus = List(Dict())
    kv_bytes = Int(0, allow_none=True)
    kv_estimate = Unicode("")
    kv_type = Unicode("")  # "f16", "q8_0", "K q8_0 / V f16"; "" when unknown
    note = Unicode("")
    engine_closed = Bool(False)

    def __init__(
        self, engine: EngineLike | None = None, *, interval: float = DEFAULT_INTERVAL, **kwargs: Any
    ) -> None:
        self._title = widgets.HTML("<b>Memory</b>")
        self._body = widgets.HTML('<span style="color:#9e9e9e">no engine</span>')

        super().__init__([self._title, self._body], **kwargs)
        self.add_class("nbollama-memory-panel")
        self._follow(engine, interval)

    @property
    def html(self) -> str:
        """What the panel shows, as HTML."""
        return str(self._body.value)

    def reset(self, engine: EngineLike | None) -> None:
        self.engine_closed = False
        if engine is None:
            self._body.value = '<span style="color:#9e9e9e">no engine</span>'

    def update(self, snapshot: EngineSnapshot | None) -> None:
        if snapshot is None or snapshot["closed"]:
            self.engine_closed = True
            self._title.value = '<b>Memory</b> <span style="color:#c62828">(engine closed: figures from before)</span>'
            return
        self.show(snapshot["memory"], remote=snapshot.get("remote"), kv=snapshot["kv"])

    def show(
        self, figures: MemoryFigures, *, remote: RemoteFigures | None = None, kv: KVSnapshot | None = None
    ) -> None:
        """Render one set of figures (from a snapshot, or ``nbollama.memory.memory_figures()``)."""
        self.source = figures["source"]
        self.process_rss = figures["process_rss"]
        self.process_pss = figures["process_pss"]
        self.host_total = figures["host_total"]
        self.host_available = figures["host_available"]
        self.gpus = [dict(g) for g in figures["gpus"]]
        self.kv_bytes = figures["kv_bytes"]
        self.kv_estimate = figures["kv_estimate"]
        self.kv_type = figures.get("kv_type") or ""
        self.note = figures["note"]
        self._title.value = "<b>Memory</b>" + {"nvml": " · NVML", "remote": " · server"}.get(
            figures["source"], " · host"
        )
        self._body.value = memory_html(figures, remote, kv)  # an unchanged string sends nothing

