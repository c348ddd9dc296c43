"""``%nbollama status``: an engine snapshot as a table of facts and one row per slot.

``StatusReport`` is what the magic returns: its ``repr`` is the plain-text
table, ``_repr_html_`` the same as HTML. A remote engine's report says what
the server told, what this kernel measured, and what is unknown.
"""

from __future__ import annotations

import html
import textwrap

from .._api.snapshot import EngineSnapshot, GPUFigures, Totals
from .._palette import badge_html
from ..memory import format_bytes

__all__ = ["StatusReport", "EnginesReport"]


def _known(value: object, unit: str = "") -> str:
    """A figure, or "unknown" (a remote server does not give every figure)."""
    return "unknown" if value is None else f"{value}{unit}"


def _known_bytes(value: int | None) -> str:
    return "unknown" if value is None else format_bytes(value)


def _adaptive_line(snapshot: EngineSnapshot) -> str:
    """Adaptive parallelism: its target, the count now of the maximum, and the last few changes."""
    adaptive = snapshot["adaptive"]
    assert adaptive is not None
    start = adaptive["history"][0]["time"] if adaptive["history"] else snapshot["time"]
    changes = "; ".join(
        f"+{h['time'] - start:.0f} s → {h['parallel']}" for h in adaptive["history"][-6:]
    )
    return (
        f"target {adaptive['target']}, {snapshot['parallel']} of {snapshot['parallel_max']} slots take requests"
        + (f"; recent changes: {changes}" if changes else "; no change yet")
    )


def _prefix_cache_line(snapshot: EngineSnapshot) -> str:
    """Whether prompts reuse cached prefixes, and how much of all prompt tokens that saved."""
    cache = snapshot["prefix_cache"]
    if not cache["enabled"]:
        return "off (every prompt is prefilled in full)"
    totals = snapshot["totals"]
    line = (
        f"on — hit rate {cache['hit_rate']:.0%}: {totals['cached_tokens']} of {totals['prompt_tokens']} "
        f"prompt tokens reused, {cache['shared_prefills']} prefixes shared across slots"
    )
    if cache.get("ram_prompts"):
        line += f", {cache['ram_prompts']} prompts kept in RAM ({format_bytes(cache['ram_bytes'] or 0)})"
    return line


def _gpu_line(gpu: GPUFigures) -> str:
    return f"GPU {gpu['index']} {gpu['name']}: {format_bytes(gpu['used'])} / {format_bytes(gpu['total'])} used"


def _totals_line(totals: Totals) -> str:
    return (
        f"{totals['submitted']} submitted, {totals['completed']} completed, {totals['cancelled']} cancelled, "
        f"{totals['errors']} errors; {totals['prompt_tokens']} prompt + {totals['generated_tokens']} generated tokens"
    )


class StatusReport:
    """A snapshot of the engine as a table: what ``%nbollama status`` returns."""

    def __init__(self, snapshot: EngineSnapshot) -> None:
        self.snapshot = snapshot

    @property
    def remote(self) -> bool:
        return self.snapshot.get("remote") is not None

    def _remote_lines(self) -> dict[str, str]:
        """The facts of a remote engine: what the server says, what this kernel measures, and the unknowns."""
        s = self.snapshot
        r = s["remote"]
        model = s["model"]
        memory = s["memory"]
        kv = s["kv"]
        where = f"{s.get('kind', 'remote')}{' ' + r['version'] if r['version'] else ''} at {s.get('endpoint')}"
        if r["host_is_local"]:
            where += " (this machine)"
        if not r["reachable"]:
            where += f" — unreachable at the last look: {r['error']}"
        details = [
            part
            for part in (model["arch"], model["size_bytes"] and format_bytes(model["size_bytes"]))
            if part
        ]
        rows = (
            "server slots" if r["rows"] == "server slots" else "of this kernel's requests in flight"
        )
        server_queue = f"server: {_known(r['server_running'])} running, {_known(r['server_waiting'])} waiting (all clients)"
        kv_text = f"{_known(kv['used'])}/{_known(kv['total'])} tokens"
        if r["kv_usage"] is not None:
            kv_text += f", {r['kv_usage']:.0%} in use"
        if r["prefix_cache_hit_rate"] is not None:
            kv_text += f", server prefix-cache hit rate {r['prefix_cache_hit_rate']:.0%}"
        memory_parts = [_gpu_line(g) for g in memory["gpus"]]
        memory_parts += [
            f"{m['name']}: {_known_bytes(m['size'])} (VRAM {_known_bytes(m['size_vram'])}), context {_known(m['context_length'])}"
            for m in r["models"]
        ]
        throughput = f"{s['throughput']:.1f} tok/s received by this kernel over the last {s['throughput_window']:.0f} s"
        if r["server_throughput"] is not None:
            throughput += f"; server {r['server_throughput']:.1f} tok/s (all clients)"
        if r["server_ttft"] is not None:
            throughput += f"; server mean TTFT {r['server_ttft']:.2f} s"
        return {
            "server": where,
            "model": model["name"]
            + (f" ({', '.join(details)})" if details else "")
            + (f" — {model['path']}" if model["path"] else ""),
            "parallel": f"{_known(r['server_parallel'])} ({r['parallel_source']})",
            "context": f"{_known(s['ctx_per_slot'])} tokens per request",
            "this kernel": (
                f"at most {r['max_inflight']} in flight: {r['in_flight']} in flight, "
                f"{r['waiting']} waiting in nbollama's queue (max {s['queue']['max']})"
            ),
            "queue": f"{s['busy_slots']}/{s['parallel']} {rows} busy; {server_queue}",
            "throughput": throughput,
            "KV cache": kv_text,
            "memory": "; ".join(memory_parts + [memory["note"]]),
            "totals": _totals_line(s["totals"]),
        }

    def _lines(self) -> dict[str, str]:
        if self.remote:
            return self._remote_lines()
        s = self.snapshot
        memory = s["memory"]
        kv = s["kv"]
        gpus = "; ".join(
            _gpu_line(g)
            + (
                f" (this process {format_bytes(g['process_used'])})"
                if g["process_used"] is not None
                else ""
            )
            for g in memory["gpus"]
        )
        host = (
            f"process RSS {format_bytes(memory['process_rss'])}, "
            f"host {format_bytes(memory['host_available'])} free of {format_bytes(memory['host_total'])}"
        )
        return {
            "model": f"{s['model']['name']} ({s['model']['arch']}, {format_bytes(s['model']['size_bytes'])}) — {s['model']['path']}",
            "parallel": (
                f"{s['parallel']} of {s['parallel_max']} slots"
                if s.get("parallel_max", s["parallel"]) != s["parallel"]
                else f"{s['parallel']} slots"
            )
            + f" × {s['ctx_per_slot']} ctx — {s['parallel_reason']}"
            + (
                " — reproducible mode (tokens independent of the batch)"
                if s.get("reproducible")
                else ""
            ),
            "queue": f"{s['queue']['length']} waiting (max {s['queue']['max']}), {s['busy_slots']}/{s['parallel']} slots busy",
            "throughput": f"{s['throughput']:.1f} tok/s over the last {s['throughput_window']:.0f} s",
            "KV cache": f"{kv['used']}/{kv['total']} cells used, {format_bytes(kv['bytes'])}"
            + (f" in {memory['kv_type']}" if memory.get("kv_type") else "")
            + f" ({memory['kv_estimate']})",
            "prefix cache": _prefix_cache_line(s),
            **({"adaptive": _adaptive_line(s)} if s.get("adaptive") else {}),
            **({"CPU path": str(s["amx"])} if s.get("amx") else {}),
            "memory": host
            + (f"; {gpus}" if gpus else "")
            + (f" — {memory['note']}" if memory["note"] else ""),
            "totals": _totals_line(s["totals"]),
        }

    def _slot_rows(self) -> list[list[str]]:
        rows = []
        unknown = "?"
        for slot in self.snapshot["slots"]:
            busy = slot["state"] != "idle"
            prefilled = (
                unknown if slot["prefilled_tokens"] is None else str(slot["prefilled_tokens"])
            )
            prompt = unknown if slot["prompt_tokens"] is None else str(slot["prompt_tokens"])
            limit = unknown if slot["max_tokens"] is None else str(slot["max_tokens"])
            preview = slot["prompt_preview"]
            if self.remote and busy and slot.get("origin") == "another client":
                preview = preview or "(another client's request)"
            row = [
                str(slot["id"]),
                slot["badge"],
                "" if slot["request_id"] is None else str(slot["request_id"]),
                f"{prefilled}/{prompt}" if busy else "",
                f"{slot['decoded_tokens']}/{limit}" if busy else "",
                (unknown if slot["tps"] is None else f"{slot['tps']:.1f}") if busy else "",
                unknown if slot["kv_used"] is None else str(slot["kv_used"]),
                preview if busy or slot["badge"] != "idle" else "",
            ]
            if self.remote:
                row.insert(2, slot.get("origin", "this kernel") if busy else "")
            rows.append(row)
        return rows

    _HEADERS = (
        "slot",
        "state",
        "request",
        "prompt tok",
        "generated",
        "tok/s",
        "KV cells",
        "prompt",
    )

    @property
    def _headers(self) -> tuple[str, ...]:
        if self.remote:
            return (*self._HEADERS[:2], "client", *self._HEADERS[2:])
        return self._HEADERS

    @property
    def _title(self) -> str:
        name = self.snapshot.get("name") or ""
        named = f" {name!r}" if name and name != "default" else ""
        if self.remote:
            return f"nbollama remote engine{named} ({self.snapshot.get('kind')})"
        return f"nbollama engine{named}"

    def __repr__(self) -> str:
        lines = [f"{self._title}{' (closed)' if self.snapshot['closed'] else ''}"]
        lines += [
            f"  {key:<11} {value}" if self.remote else f"  {key:<10} {value}"
            for key, value in self._lines().items()
        ]
        headers = self._headers
        rows = [list(headers), *self._slot_rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(headers) - 1)]
        for row in rows:
            cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
            lines.append(
                "  " + "  ".join(cells) + "  " + textwrap.shorten(row[-1], 50, placeholder="…")
            )
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        facts = "".join(
            f'<tr><th style="text-align:left;padding-right:1em;white-space:nowrap;vertical-align:top">'
            f"{html.escape(key)}</th>"
            f'<td style="text-align:left">{html.escape(value)}</td></tr>'
            for key, value in self._lines().items()
        )
        head = "".join(
            f'<th style="text-align:left;white-space:nowrap">{h}</th>' for h in self._headers
        )
        body = []
        for row in self._slot_rows():
            badge = badge_html(row[1], style="inline")
            cells = [html.escape(row[0]), badge, *(html.escape(c) for c in row[2:])]
            body.append(
                "<tr>" + "".join(f'<td style="text-align:left">{c}</td>' for c in cells) + "</tr>"
            )
        closed = " (closed)" if self.snapshot["closed"] else ""
        return (
            '<div class="nbollama-status"><div style="font-weight:bold;white-space:nowrap">'
            f"{html.escape(self._title)}{closed}</div>"
            f'<table class="nbollama-status-facts">{facts}</table>'
            f'<table class="nbollama-status-slots"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )


class EnginesReport:
    """``%nbollama status`` with several engines: one line each, then each engine's own report."""

    def __init__(self, reports: dict[str, StatusReport], default: str | None) -> None:
        self.reports = reports
        self.default = default

    def _rows(self) -> list[list[str]]:
        rows = []
        for name, report in self.reports.items():
            s = report.snapshot
            memory = s["memory"]
            kv = memory["kv_bytes"]
            rows.append(
                [
                    name + (" (default)" if name == self.default else ""),
                    "local" if s["kind"] == "local" else f"{s['kind']} {s.get('endpoint') or ''}".strip(),
                    s["model"]["name"],
                    f"{s['parallel']}" + (f" of {s['parallel_max']}" if s["parallel_max"] != s["parallel"] else ""),
                    "?" if s["ctx_per_slot"] is None else str(s["ctx_per_slot"]),
                    ("unknown" if kv is None else format_bytes(kv))
                    + (f" {memory['kv_type']}" if memory.get("kv_type") else ""),
                    f"{s['throughput']:.1f}",
                    f"{s['totals']['completed']}",
                ]
            )
        return rows

    _HEADERS = ("engine", "kind", "model", "parallel", "ctx/slot", "KV cache", "tok/s", "completed")

    def __repr__(self) -> str:
        rows = [list(self._HEADERS), *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._HEADERS))]
        lines = [f"nbollama: {len(self.reports)} engines"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        for name, report in self.reports.items():
            lines += ["", f"[{name}]", repr(report)]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f'<th style="text-align:left">{h}</th>' for h in self._HEADERS)
        body = "".join(
            "<tr>" + "".join(f'<td style="text-align:left">{html.escape(c)}</td>' for c in row) + "</tr>"
            for row in self._rows()
        )
        details = "".join(
            f"<details{' open' if name == self.default else ''}><summary>{html.escape(name)}</summary>"
            f"{report._repr_html_()}</details>"
            for name, report in self.reports.items()
        )
        return (
            f'<div class="nbollama-engines"><b>nbollama: {len(self.reports)} engines</b>'
            f'<table class="nbollama-engines-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f"{details}</div>"
        )
