"""What the parallelism sweep (``nbollama.bench``) and the remote concurrency sweep share:
the prompts they send by default, the progress they show and their log-axis charts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DEFAULT_PROMPTS", "sweep_progress", "log_range", "mark_on_log_axis"]

#: Short, varied prompts so answers differ in length, as real traffic does.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain in two sentences why the sky looks blue.",
    "Write a haiku about a GPU running out of memory.",
    "List three differences between a list and a tuple in Python.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What is the derivative of x squared times sine of x?",
    "Give a short definition of continuous batching.",
    "Write a Python function that reverses a string.",
    "Name four planets and one fact about each.",
    "Why do neural networks need non-linear activations?",
    "Describe the water cycle for a ten-year-old.",
    "Write a limerick about a cat who learns to code.",
    "What are the main causes of the French Revolution?",
    "Explain what a hash table is and when to use one.",
    "Give three tips for writing a clear abstract.",
    "What is the difference between latency and throughput?",
    "Explain the Pythagorean theorem with an example.",
    "Write a SQL query that counts orders per customer.",
    "What does a key-value cache store in a transformer?",
    "Suggest a name for a coffee shop run by robots.",
    "Describe how a bicycle stays upright.",
    "What is photosynthesis, in one paragraph?",
    "Give an example of a recursive function.",
    "Why is the ocean salty?",
    "Explain what a compiler does.",
)


def sweep_progress(total: int) -> Callable[[str], None]:
    """A widget progress bar in a notebook kernel, a printed line elsewhere."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None and getattr(shell, "kernel", None) is not None:
            import ipywidgets as widgets
            from IPython.display import display

            bar = widgets.IntProgress(value=0, min=0, max=total, description="sweep", bar_style="info")
            label = widgets.Label("starting")
            display(  # type: ignore[no-untyped-call]  # IPython: no annotations
                widgets.HBox([bar, label])
            )

            def step(text: str) -> None:
                bar.value = min(total, bar.value + 1)
                label.value = text
                if bar.value >= total:
                    bar.bar_style = "success"

            return step
    except ImportError:
        pass
    count = [0]

    def step_text(text: str) -> None:
        count[0] += 1
        print(f"[{count[0]}/{total}] {text}", flush=True)

    return step_text


def log_range(xs: Sequence[float], pad: float = 0.12) -> list[float]:
    """An x range for a log axis, in plotly's units for one (log10), a little wider than ``xs``.

    Left to autorange, a log axis with a single value, or with a shape or
    annotation placed in data units, can stretch far past the data.
    """
    lo, hi = math.log10(min(xs)), math.log10(max(xs))
    span = max(hi - lo, 0.3)
    return [lo - pad * span, hi + pad * span]


def mark_on_log_axis(
    fig: Any, x: float, text: str, *, colour: str, xs: Sequence[float], dash: str = "dash"
) -> None:
    """A vertical line at ``x`` on a log x axis, labelled at its top.

    ``add_vline`` puts its label at ``x`` as if the axis were linear, but a
    log axis places annotations at log10(x): the label of ``recommended: 8``
    landed at 10^8 and dragged the axis range with it. The line is a shape
    (data units), the label an annotation at log10(x), on the side of the
    line with more room (``xs``: the values on the axis).
    """
    middle = (math.log10(min(xs)) + math.log10(max(xs))) / 2
    anchor = "right" if math.log10(x) > middle else "left"
    fig.add_shape(
        type="line",
        xref="x",
        yref="paper",
        x0=x,
        x1=x,
        y0=0,
        y1=1,
        line={"color": colour, "dash": dash},
    )
    fig.add_annotation(
        x=math.log10(x),
        xref="x",
        y=1,
        yref="paper",
        text=text,
        showarrow=False,
        xanchor=anchor,
        yanchor="bottom",
        font={"color": colour},
    )
