"""``%nbollama eval``: lm-evaluation-harness tasks on the kernel's engines, watched live.

Parsed and checked first (``_parse_nbollama``); then the tasks are found and
every engine is asked whether it can answer each request kind, before
anything is sent or shown. While it runs, ONE display, updated from the
cell's own thread at most every ``REFRESH_SECONDS``: a bar per task,
requests/s, and the big-cell view of the kind running now (its bar, the
requests in the slots, the latest answers). lm-eval's own logs, prints and
tqdm bars are captured, never shown. The display ends as a line per engine;
the cell's value is the ``EvalResults`` table (also in ``--out VAR``).
"""

from __future__ import annotations

import html
import importlib.util
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError
from IPython.display import DisplayHandle, display

from .. import session
from .._api.feed import Feeder
from .._api.progress import progress_html, progress_state, progress_text
from .._api.requests import Result
from .._eval_results import EvalResults
from .._palette import BADGE_COLOURS
from ..engine import EngineLike
from ..exceptions import NbollamaError
from ._parse_nbollama import EvalCall
from ._render import default_loaded_message
from ._run import REFRESH_SECONDS, load_engine, named_or_usage

__all__ = ["NO_EVAL_EXTRA", "EvalView", "run_eval"]

NO_EVAL_EXTRA = "%nbollama eval needs lm-evaluation-harness, which is not installed: pip install 'nbollama[eval]'"
#: The view's clock and rates move on at least this often while requests run.
_CLOCK_SECONDS = 1.0
_PROG = "%nbollama eval"


@dataclass
class _Run:
    """One engine's run as the view shows it."""

    engine: str
    tasks: list[str]
    started: float = field(default_factory=time.perf_counter)
    done: dict[str, int] = field(default_factory=dict)  # per task, of the kinds that ended
    total: dict[str, int] = field(default_factory=dict)
    kind: str | None = None
    feeder: Feeder | None = None
    of: Sequence[str] = ()  # the task of each of the feeder's prompts
    ended: str | None = None  # the engine's closing line

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per task: (done, total) so far, the running kind's finished requests included."""
        now = dict(self.done)
        if self.feeder is not None:
            for task, item in zip(self.of, self.feeder.items):
                if isinstance(item, Result):
                    now[task] = now.get(task, 0) + 1
        order = self.tasks + [t for t in self.total if t not in self.tasks]
        return {t: (now.get(t, 0), self.total.get(t, 0)) for t in order}

    def rate(self) -> float:
        finished = sum(d for d, _ in self.counts().values())
        seconds = time.perf_counter() - self.started
        return finished / seconds if seconds > 0 else 0.0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def _bar(done: int, total: int) -> str:
    fraction = done / total if total else 0.0
    colour = BADGE_COLOURS["done" if total and done >= total else "generating"]
    return (
        '<div style="width:160px;height:8px;border-radius:4px;overflow:hidden;'
        'background:var(--jp-layout-color3,#e0e0e0)">'
        f'<div style="width:{100 * fraction:.1f}%;height:100%;background:{colour}"></div></div>'
    )


class EvalView:
    """The live display of ``%nbollama eval`` (an ``EvalObserver``): every call on the cell's thread."""

    def __init__(self) -> None:
        self.runs: list[_Run] = []
        self.display: DisplayHandle | None = None
        self._shown: object = None
        self._shown_at = 0.0

    # -- what the evaluation tells it --------------------------------------------------------------

    def begin(self, engine: str, tasks: Sequence[str]) -> None:
        self.runs.append(_Run(engine, list(tasks)))
        self.refresh(force=True)

    def started(self, kind: str, feeder: Feeder, tasks: Sequence[str]) -> None:
        run = self.runs[-1]
        for task in tasks:
            run.total[task] = run.total.get(task, 0) + 1
        run.kind, run.feeder, run.of = kind, feeder, tasks
        self.refresh(force=True)

    def tick(self) -> None:
        self.refresh()

    def finished(self) -> None:
        run = self.runs[-1]
        run.done = {t: d for t, (d, _) in run.counts().items()}
        run.kind, run.feeder, run.of = None, None, ()
        self.refresh(force=True)

    def end(self, results: EvalResults) -> None:
        run = self.runs[-1]
        seconds = results.seconds.get(run.engine, 0.0)
        n = results.requests.get(run.engine, 0)
        rate = f" · {n / seconds:.1f} requests/s" if seconds else ""
        run.ended = f"{run.engine}: {n} requests in {seconds:.1f} s{rate}"
        self.refresh(force=True)

    def stopped(self) -> None:
        """Ctrl-C: the running kind's requests were cancelled; the display keeps where it got."""
        if self.runs and self.runs[-1].ended is None:
            self.runs[-1].ended = f"{self.runs[-1].engine}: stopped"
            self.runs[-1].feeder = None
        self.refresh(force=True)

    # -- drawing ----------------------------------------------------------------------------------

    def _key(self) -> object:
        return tuple(
            (
                r.engine,
                r.kind,
                r.ended,
                tuple(r.counts().items()),
                r.feeder and progress_state(r.feeder).key(),
            )
            for r in self.runs
        )

    def refresh(self, *, force: bool = False) -> None:
        """Update the display when what it shows changed (its clock: at most once a second)."""
        key = self._key()
        now = time.monotonic()
        if not force and key == self._shown and now - self._shown_at < _CLOCK_SECONDS:
            return
        if not force and now - self._shown_at < REFRESH_SECONDS:
            return
        self._shown, self._shown_at = key, now
        bundle = self.bundle()
        if self.display is None:
            self.display = display(bundle, raw=True, display_id=True)
        else:
            self.display.update(bundle, raw=True)

    def bundle(self) -> dict[str, str]:
        return {"text/html": self.html(), "text/plain": self.text()}

    def _head(self, run: _Run) -> str:
        parts = [f"engine {run.engine}"]
        parts.append(run.kind or ("done" if run.ended else "loading tasks"))
        parts.append(f"{run.rate():.1f} requests/s")
        parts.append(f"{_clock(time.perf_counter() - run.started)} elapsed")
        return " · ".join(parts)

    def html(self) -> str:
        sections = []
        cell = 'style="text-align:left;padding:1px 10px 1px 0;white-space:nowrap"'
        for run in self.runs:
            if run.ended is not None:
                sections.append(f"<div>✓ {html.escape(run.ended)}</div>")
                continue
            rows = "".join(
                f"<tr><td {cell}>{html.escape(task)}</td><td {cell}>{_bar(d, t)}</td>"
                f"<td {cell}>{d}/{t}</td></tr>"
                for task, (d, t) in run.counts().items()
            )
            body = f'<table class="nbollama-eval-tasks">{rows}</table>' if rows else ""
            live = (
                progress_html(progress_state(run.feeder), title=run.kind or "")
                if run.feeder
                else ""
            )
            sections.append(
                f"<div><b>nbollama eval</b> · {html.escape(self._head(run))}</div>{body}{live}"
            )
        return (
            '<div class="nbollama-eval" style="font-size:12px;line-height:1.5">'
            + "".join(sections)
            + "</div>"
        )

    def text(self) -> str:
        lines = []
        for run in self.runs:
            if run.ended is not None:
                lines.append(run.ended)
                continue
            lines.append("nbollama eval · " + self._head(run))
            lines += [f"  {task}: {d}/{t}" for task, (d, t) in run.counts().items()]
            if run.feeder is not None:
                lines.append(progress_text(progress_state(run.feeder)))
        return "\n".join(lines)


def _has_lm_eval() -> bool:
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def _engines(call: EvalCall) -> list[EngineLike]:
    """The engines named, each checked to exist; none named: the kernel's (the bundled model
    is loaded when there is none)."""
    if call.engines:
        return [named_or_usage(f"{_PROG} --engine", name) for name in call.engines]
    engine = session.current_engine()
    if engine is None:
        engine = load_engine(_PROG, parallel="auto")
        print(default_loaded_message(engine.summary))
    return [engine]


def run_eval(shell: Any, call: EvalCall) -> EvalResults:
    """Evaluate, show it live, store ``--out``; a task, an engine or a request kind that cannot
    run is a one-line UsageError before anything is sent."""
    if not _has_lm_eval():
        raise UsageError(NO_EVAL_EXTRA)
    from ..eval import evaluate  # lm-eval's import takes a second: only when asked

    engines = _engines(call)
    view = EvalView()
    try:
        results = evaluate(
            list(call.tasks),
            engine=engines,
            limit=call.limit,
            num_fewshot=call.num_fewshot,
            include_path=list(call.include_paths),
            observer=view,
        )
    except (
        NbollamaError
    ) as exc:  # a task not found, a kind an engine cannot answer, failed requests
        if view.runs:
            view.stopped()
        raise UsageError(f"{_PROG}: {exc}") from None
    except BaseException:
        view.stopped()
        raise
    if call.out is not None:
        shell.user_ns[call.out] = results
    return results
