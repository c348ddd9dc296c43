"""Big ``%%generate`` cells and datasets: one compact view, ``--each`` over a DataFrame, Ctrl-C, background feeding.

Displays are captured with IPython's own ``CapturingDisplayPublisher``: each
``display``/``update_display`` call is one recorded output, as a kernel would
send one ``display_data``/``update_display_data`` message.
"""

from __future__ import annotations

import _thread
import re
import threading
import time
from typing import Any

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from magic_displays import cards
from magic_displays import payload as _payload

from nbollama import Engine, session
from nbollama.results import BackgroundGeneration, Results

# -- big cells and datasets --------------------------------------------------------------------


def test_a_big_cell_shows_one_compact_view(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    prompts = [f"Line {i}: the sea is" for i in range(80)]
    results = shell.run_cell_magic(
        "generate", "--lines --max-tokens 2 --temperature 0 --out many", "\n".join(prompts)
    )
    assert [r.prompt for r in results] == prompts and results.ok
    assert shell.user_ns["many"] is results
    first, *updates = shown
    assert 'class="nbollama-progress"' in first["data"]["text/html"]
    assert all("nbollama-card" not in o["data"]["text/html"] for o in shown)
    assert all(_payload(o) < 50_000 for o in shown)
    assert len(updates) >= 2
    middle = [u for u in updates if "latest" in u["data"]["text/html"]]
    assert middle, "while it runs the view lists the latest results"
    final = updates[-1]["data"]
    assert "<b>80/80</b> done" in final["text/html"] and "80 length" in final["text/html"]
    assert "nbollama-slots" not in final["text/html"]  # nothing runs any more
    assert "<code>many</code>" in final["text/html"]
    table = results._repr_html_()  # the cell's value: a summary, not 150 rows
    assert table.count("<tr>") < 20 and "70 more rows" in table


def test_cards_forces_a_card_per_prompt_and_headers_show_what_differs(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    shell.user_ns["animals"] = [f"animal number {i}" for i in range(20)]
    results = shell.run_cell_magic(
        "generate",
        "--each animals --cards --max-tokens 1",
        "Write one long and careful sentence about the {item}",
    )
    assert len(results) == 20
    final = shown[-1]["data"]["text/html"]
    assert len(cards(final)) == 20
    head = re.search(r'<span title="([^"]*)"[^>]*>([^<]*)</span>', cards(final)[7])
    assert head is not None
    assert head.group(1) == "Write one long and careful sentence about the animal number 7"
    assert head.group(2) == "…7", "the shared template is elided in the header"


def test_each_over_a_dataframe_fills_columns_and_joins_back(
    shell: InteractiveShell, kernel_engine: Engine
) -> None:
    pandas = pytest.importorskip("pandas")
    df = pandas.DataFrame(
        {"review": ["Great film!", "Dull and long.", "Loved it."], "stars": [5, 1, 4]},
        index=["a", "b", "c"],
    )
    shell.user_ns["df"] = df
    results = shell.run_cell_magic(
        "generate",
        "--each df --max-tokens 2 --temperature 0 --quiet",
        "Classify ({stars} stars, row {index}): {review}",
    )
    assert [r.prompt for r in results] == [
        "Classify (5 stars, row a): Great film!",
        "Classify (1 stars, row b): Dull and long.",
        "Classify (4 stars, row c): Loved it.",
    ]
    assert results.row_labels == ("a", "b", "c") and results.index(results[1]) == 1  # Sequence.index
    assert list(results.to_pandas().index) == ["a", "b", "c"]
    joined = results.to_pandas(join=df)
    assert list(joined["review"]) == list(df["review"]) and list(joined["text"]) == results.texts
    shell.user_ns["reviews"] = df["review"]
    series = shell.run_cell_magic(
        "generate", "--each reviews --max-tokens 1 --quiet", "Review: {item}"
    )
    assert series.row_labels == ("a", "b", "c")
    assert series[1].prompt == "Review: Dull and long."


def test_a_missing_column_is_an_error_before_any_load(
    shell: InteractiveShell, no_engine: None
) -> None:
    pandas = pytest.importorskip("pandas")
    shell.user_ns["df"] = pandas.DataFrame({"review": ["ok"], "stars": [3]})
    with pytest.raises(
        UsageError, match=r"\{revew\}, which is not a column of df \(did you mean \{review\}\?\)"
    ):
        shell.run_cell_magic("generate", "--each df --max-tokens 2", "Classify: {revew}")
    shell.user_ns["df"] = 42
    with pytest.raises(
        UsageError, match=r"of type int \(a list, tuple, pandas Series or DataFrame\)"
    ):
        shell.run_cell_magic("generate", "--each df", "x")
    shell.user_ns["df"] = pandas.DataFrame({"review": []})
    with pytest.raises(UsageError, match="has no rows"):
        shell.run_cell_magic("generate", "--each df", "Classify: {review}")
    assert session.current_engine() is None


def test_ctrl_c_in_a_big_cell_keeps_what_finished(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    def interrupt_after_some() -> None:
        deadline = time.monotonic() + 60
        start = kernel_engine.snapshot()["totals"]["completed"]
        while kernel_engine.snapshot()["totals"]["completed"] < start + 10:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        _thread.interrupt_main()

    prompts = [f"Story {i}:" for i in range(400)]
    shell.user_ns.pop("cut", None)
    interrupter = threading.Thread(target=interrupt_after_some)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        shell.run_cell_magic("generate", "--lines --max-tokens 3 --out cut", "\n".join(prompts))
    interrupter.join()
    cut = shell.user_ns["cut"]
    assert isinstance(cut, Results) and [r.prompt for r in cut] == prompts
    assert sum(r.ok for r in cut) >= 10 and cut.finish_reasons()["cancelled"] > 300
    final = shown[-1]["data"]["text/html"]
    assert "stopped" in final and "cancelled" in final


def test_results_and_status_tables_do_not_wrap_their_figures(
    shell: InteractiveShell, kernel_engine: Engine
) -> None:
    results = shell.run_line_magic("generate", "--max-tokens 2 --quiet Hi")
    assert re.search(r'<td style="white-space:nowrap">\d+ ms</td>', results._repr_html_())
    page = shell.run_line_magic("nbollama", "status")._repr_html_()
    assert '<div style="font-weight:bold;white-space:nowrap">nbollama engine</div>' in page
    assert '<th style="text-align:left;padding-right:1em;white-space:nowrap' in page


def test_a_big_background_cell_feeds_from_its_thread_and_ends_with_the_summary(
    shell: InteractiveShell, kernel_engine: Engine, shown: list[dict[str, Any]]
) -> None:
    prompts = [f"Background {i}:" for i in range(40)]
    job = shell.run_cell_magic("generate", "-b --lines --max-tokens 1 --out bg", "\n".join(prompts))
    assert isinstance(job, BackgroundGeneration) and "40 prompts running" in repr(job)
    results = job.wait(timeout=120)
    assert [r.prompt for r in results] == prompts and shell.user_ns["bg"] is results
    final = shown[-1]["data"]["text/html"]
    assert "<b>40/40</b> done" in final and "nbollama-results-stats" in final  # the summary
    assert "30 more rows" in final and _payload(shown[-1]) < 50_000
