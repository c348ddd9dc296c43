"""What ``look_in_lab.py`` finds in a notebook's output areas: the DOM scan run in the page
(``JS_SCAN``), the problems and layout warnings judged from it, and the report per notebook."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "JS_SCAN",
    "PANEL",
    "TEXT_LIMIT",
    "NotebookReport",
    "Problem",
    "dedupe",
    "judge",
    "layout_warnings",
    "shown",
]

REPO = Path(__file__).resolve().parent.parent
TEXT_LIMIT = 300
#: The visible notebook panel (one per workspace here, but hidden tabs stay in the DOM).
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"


@dataclass
class Problem:
    cell: int  # 1-based position among all cells (JupyterLab's "Cell N/M"); 0 for the page
    kind: str
    text: str

    def __str__(self) -> str:
        where = f"cell {self.cell}" if self.cell else "page"
        text = self.text[:TEXT_LIMIT].rstrip().replace("\n", "\n      | ")
        return f"{where}: {self.kind}: {text}"


@dataclass
class NotebookReport:
    name: str
    code_cells: int = 0
    cells_run: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # layout: cut-off charts and widgets
    screenshots: list[Path] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        """Everything, with the problems' full texts (as scanned, up to 2000 characters)."""
        return {
            "name": self.name,
            "code_cells": self.code_cells,
            "cells_run": self.cells_run,
            "seconds": round(self.seconds, 1),
            "problems": [vars(p) for p in self.problems],
            "warnings": [vars(p) for p in self.warnings],
            "console_errors": self.console_errors,
            "screenshots": [shown(p) for p in self.screenshots],
        }

    def format(self) -> str:
        lines = [
            f"== {self.name}: {self.cells_run}/{self.code_cells} code cells run in "
            f"{self.seconds:.0f} s, {len(self.problems)} problem(s), {len(self.warnings)} warning(s)"
        ]
        lines += [f"   PROBLEM {p}" for p in self.problems]
        lines += [f"   WARNING {p}" for p in self.warnings]
        lines += [f"   (browser console error: {e[:TEXT_LIMIT]})" for e in self.console_errors]
        lines += [f"   screenshot {shown(p)}" for p in self.screenshots]
        return "\n".join(lines)


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# Every output area's state, cell by cell; the problems are judged in Python.
JS_SCAN = f"""() => {{
    const text = el => (el.innerText || el.textContent || '').trim();
    // how many px of el's right side are hidden by an ancestor that clips (up to the cell)
    const cutOff = (el, stop, own = false) => {{
        let right = el.getBoundingClientRect().right;
        if (own && getComputedStyle(el).overflowX !== 'visible')
            right = Math.max(right, el.getBoundingClientRect().left + el.scrollWidth);
        let hidden = 0;
        for (let e = own ? el : el.parentElement; e && e !== stop; e = e.parentElement) {{
            if (getComputedStyle(e).overflowX === 'visible') continue;
            const b = e.getBoundingClientRect();
            hidden = Math.max(hidden, right - (b.left + e.clientWidth));
        }}
        return hidden;
    }};
    const cells = [...document.querySelectorAll('{PANEL} .jp-Notebook .jp-Cell')];
    const app = window.jupyterapp;
    const current = app && app.shell.currentWidget;
    const nb = current && current.content && current.content.widgets
        && current.content.widgets.length === cells.length ? current : null;
    return cells.map((cell, i) => {{
        if (!cell.classList.contains('jp-CodeCell')) return null;
        const prompt = cell.querySelector('.jp-InputArea-prompt');
        const area = cell.querySelector('.jp-OutputArea');
        const outputs = area ? [...area.querySelectorAll('.jp-OutputArea-output')] : [];
        // the model says which outputs are errors (JupyterLab renders them as stderr text)
        const widget = nb && nb.content.widgets[i];
        const model = widget && widget.model && widget.model.outputs;
        const types = [];
        if (model) for (let j = 0; j < model.length; j++) types.push(model.get(j).type);
        const children = area ? [...area.querySelectorAll(':scope > .jp-OutputArea-child')] : [];
        const plots = area ? [...area.querySelectorAll('.js-plotly-plot')].map(p => {{
            const traces = Array.isArray(p.data) ? p.data : [];
            const length = v => (v && typeof v.length === 'number') ? v.length : 0;
            const points = traces.map(t => Math.max(length(t.x), length(t.y), length(t.z),
                                                    length(t.values), length(t.lat)));
            const box = p.getBoundingClientRect();
            const named = p.querySelector('.gtitle') || p.querySelector('.annotation-text');
            const title = named ? named.textContent : '';
            return {{traces: traces.length, points, width: box.width, height: box.height,
                     hasData: Array.isArray(p.data), title: String(title || ''),
                     cutOff: Math.round(cutOff(p.querySelector('.main-svg') || p, cell))}};
        }}) : [];
        // widgets whose content is wider than their box (plots are measured above)
        const wide = area ? [...area.querySelectorAll('.jupyter-widgets')]
            .filter(w => !w.querySelector('.js-plotly-plot') && !w.closest('.js-plotly-plot'))
            .map(w => ({{name: (w.className.match(/nbollama-[\\w-]+/) || ['a widget'])[0],
                         over: Math.round(cutOff(w, cell, true))}}))
            .filter(w => w.over > 2) : [];
        return {{
            index: i + 1,
            prompt: prompt ? prompt.textContent.trim() : '',
            outputs: outputs.map(o => {{
                const child = o.closest('.jp-OutputArea-child');
                const j = children.indexOf(child);
                return {{
                    mime: o.getAttribute('data-mime-type') || '',
                    type: (j >= 0 && types.length === children.length) ? types[j] : '',
                    text: text(o).slice(0, 2000),
                }};
            }}),
            errors: area ? [...area.querySelectorAll(
                '[data-mime-type="application/vnd.jupyter.error"], .jp-OutputArea-error'
            )].map(e => text(e).slice(0, 2000)) : [],
            widgetText: area ? [...area.querySelectorAll(
                '.jp-OutputArea-output, .jupyter-widgets'
            )].map(text).filter(t => /^(Loading widget\\.\\.\\.|Error displaying widget)/.test(t))
                .slice(0, 5) : [],
            cardErrors: area ? [...area.querySelectorAll('.nbollama-card .nbollama-error')]
                .map(text).filter(Boolean) : [],
            plots,
            widgets: area ? area.querySelectorAll('.jupyter-widgets, .widget-box, ' +
                '[data-mime-type="application/vnd.jupyter.widget-view+json"]').length : 0,
            cards: area ? area.querySelectorAll('.nbollama-generate, .nbollama-compare').length : 0,
            wide,
        }};
    }}).filter(Boolean);
}}"""

_TRACEBACK = re.compile(r"Traceback \(most recent call last\)|^-{20,}\s*\n\w+(Error|Exception)")
_WIDGET_REPR = re.compile(r"^[A-Z]\w*\((children|layout|value)=")


def layout_warnings(cells: list[dict[str, Any]]) -> list[Problem]:
    """Charts and widgets cut off on the right: shown, not failed (``--strict`` fails them)."""
    warnings: list[Problem] = []
    for cell in cells:
        n = cell["index"]
        for k, plot in enumerate(cell["plots"], 1):
            if plot["cutOff"] > 2:
                name = f"plot {k}" + (f" {plot['title']!r}" if plot["title"] else "")
                warnings.append(
                    Problem(
                        n,
                        "chart cut off",
                        f"{name}: {plot['cutOff']} px of its right side hidden "
                        f"(drawn in a {plot['width']:.0f} px wide box)",
                    )
                )
        for widget in cell["wide"]:
            warnings.append(
                Problem(
                    n,
                    "widget cut off",
                    f"{widget['name']}: content {widget['over']} px wider than its box",
                )
            )
    return warnings


def judge(cells: list[dict[str, Any]]) -> list[Problem]:
    """Problems in the scanned output areas (see ``JS_SCAN``)."""
    problems: list[Problem] = []
    for cell in cells:
        n = cell["index"]
        if not re.fullmatch(r"\[\d+\]:?", cell["prompt"]):
            problems.append(Problem(n, "not run", f"prompt is {cell['prompt']!r}"))
        for text in cell["errors"]:
            problems.append(Problem(n, "error", text))
        for output in cell["outputs"]:
            if output["type"] == "error" or (
                output["mime"] == "application/vnd.jupyter.stderr"
                and not output["type"]
                and _TRACEBACK.search(output["text"])
            ):
                # the traceback's first line is a rule of dashes: start at the exception
                problems.append(Problem(n, "error", re.sub(r"^-{20,}\s*", "", output["text"])))
            elif output["mime"] == "application/vnd.jupyter.stderr":
                problems.append(Problem(n, "stderr", output["text"]))
            elif output["mime"] == "text/plain" and _WIDGET_REPR.match(output["text"]):
                problems.append(Problem(n, "widget shown as text", output["text"]))
        for text in cell["widgetText"]:
            problems.append(Problem(n, "widget not rendered", text))
        for text in cell["cardErrors"]:
            problems.append(Problem(n, "%%generate card error", text))
        for k, plot in enumerate(cell["plots"], 1):
            name = f"plot {k}" + (f" {plot['title']!r}" if plot["title"] else "")
            if not plot["hasData"] or not any(plot["points"]):
                problems.append(
                    Problem(
                        n,
                        "empty plotly chart",
                        f"{name}: {plot['traces']} trace(s), points per trace {plot['points']}",
                    )
                )
            if plot["width"] < 10 or plot["height"] < 10:
                problems.append(
                    Problem(
                        n,
                        "plotly chart without size",
                        f"{name}: {plot['width']:.0f}x{plot['height']:.0f} px",
                    )
                )
    return problems


def dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[int, str, str]] = set()
    kept = []
    for p in problems:
        key = (p.cell, p.kind, p.text[:TEXT_LIMIT])
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept
