"""The magics in a real kernel: one notebook, executed by nbclient in an ipykernel.

What only a real kernel shows: the live display is updated with several
``update_display_data`` messages per prompt; a ``--background`` cell lets the
next cells run and keeps updating its own output from a thread; a kernel
interrupt during a foreground cell cancels its requests and the next cell
generates normally.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import sys
from typing import Any

import nbformat
import pytest
from jupyter_client.utils import ensure_async
from nbclient import NotebookClient
from nbformat import NotebookNode

pytestmark = pytest.mark.notebook

CELLS: list[tuple[str, list[str]]] = [
    ("%load_ext nbollama", []),
    ("%nbollama load --parallel 2 --ctx 2048", []),
    ('topic = "GPUs"', []),
    (  # 3: foreground, three prompts on two slots
        "%%generate --max-tokens 96 --temperature 0.8 --seed 3 --out fg\n"
        "Write a haiku about {topic}.\n---\nThe three primary colours are\n---\n"
        'A JSON object: {"name": "x", "size": {unknown}}',
        [],
    ),
    (
        "import json\nprint(json.dumps([[r.prompt, r.finish_reason, r.completion_tokens] for r in fg]))",
        [],
    ),
    (  # 5, 6: two background cells sharing the slots
        "%%generate -b --max-tokens 40 --seed 4 --out bg1\nOnce upon a time\n---\nThe weather today is",
        [],
    ),
    ("%%generate --background --max-tokens 24 --seed 5 --out bg2\nMy favourite food is", []),
    (  # 7: runs while they generate
        "jobs = [v for v in Out.values() if type(v).__name__ == 'BackgroundGeneration']\n"
        "print(json.dumps({'jobs': len(jobs), 'done': [j.done() for j in jobs],"
        " 'held': [type(bg1).__name__, type(bg2).__name__]}))",
        [],
    ),
    (  # 8: wait; the background threads' updates arrive while this cell runs
        "results = [j.wait(timeout=300) for j in jobs]\n"
        "print(json.dumps({'n': [len(r) for r in results], 'same': [results[0] is bg1, results[1] is bg2],"
        " 'reasons': [r.finish_reason for r in list(bg1) + list(bg2)], 'done': [j.done() for j in jobs]}))",
        [],
    ),
    (  # 9: interrupted by the test once it streams
        "%%generate --max-tokens 2000 --out cut\nWrite a very long story about a dragon who learns to code.",
        ["interrupt", "raises-exception"],
    ),
    (
        "from nbollama import current_engine\nsnap = current_engine().snapshot()\n"
        "print(json.dumps({'reason': cut[0].finish_reason, 'tokens': cut[0].completion_tokens,"
        " 'busy': snap['busy_slots'], 'queue': snap['queue']['length']}))",
        [],
    ),
    ("%%generate --max-tokens 12 --out after\nThe capital of France is", []),
    ("print(json.dumps([after[0].finish_reason, after[0].completion_tokens]))", []),
    (  # 13, 14: logprobs and choices, as a saved notebook keeps them
        "%%generate --logprobs 3 --max-tokens 6 --temperature 0 --out lp\nThe sky is",
        [],
    ),
    ("%%generate --choices yes,no --out yn\nIs water wet? Answer:", []),
]


class RecordingClient(NotebookClient):
    """Keeps every display message it sees and interrupts the kernel in cells tagged ``interrupt``."""

    def __init__(self, nb: NotebookNode, **kw: Any) -> None:
        super().__init__(nb, **kw)
        self.displays: list[dict[str, Any]] = []  # what nbclient processed (the executing cell's)
        self.wire: list[dict[str, Any]] = []  # every display message on iopub, whoever its parent
        self.cell_msg_ids: dict[int, str] = {}
        self.interrupted_at: int | None = None
        self.on_notebook_start = self._tap_iopub

    def _tap_iopub(self, notebook: NotebookNode) -> None:
        """Also see the messages nbclient drops: those whose parent is not the executing cell."""
        assert self.kc is not None
        channel = self.kc.iopub_channel
        get_msg = channel.get_msg

        async def recording_get_msg(*args: Any, **kwargs: Any) -> dict[str, Any]:
            msg = await ensure_async(get_msg(*args, **kwargs))
            if msg["msg_type"] in ("display_data", "update_display_data"):
                transient = msg["content"].get("transient") or {}
                self.wire.append(
                    {
                        "parent": msg["parent_header"].get("msg_id"),
                        "type": msg["msg_type"],
                        "display_id": transient.get("display_id"),
                        "html": msg["content"].get("data", {}).get("text/html", ""),
                        "bytes": len(json.dumps(msg["content"])),
                    }
                )
            return msg

        channel.get_msg = recording_get_msg

    def process_message(
        self, msg: dict[str, Any], cell: NotebookNode, cell_index: int
    ) -> NotebookNode | None:
        msg_type = msg["msg_type"]
        self.cell_msg_ids[cell_index] = msg["parent_header"]["msg_id"]
        if msg_type in ("display_data", "update_display_data"):
            transient = msg["content"].get("transient") or {}
            self.displays.append(
                {
                    "cell": cell_index,  # the cell executing when it arrived
                    "type": msg_type,
                    "display_id": transient.get("display_id"),
                    "data": copy.deepcopy(msg["content"].get("data", {})),
                }
            )
            tags = cell.metadata.get("tags", [])
            html_data = msg["content"]["data"].get("text/html", "")
            if (
                msg_type == "update_display_data"
                and self.interrupted_at is None
                and (
                    ("interrupt" in tags and _texts(html_data)[0])
                    or ("interrupt-big" in tags and _progress_done(html_data) >= 40)
                )
            ):
                self.interrupted_at = cell_index
                asyncio.get_running_loop().call_later(
                    0.5, lambda: asyncio.ensure_future(self._interrupt())
                )
        return super().process_message(msg, cell, cell_index)

    async def _interrupt(self) -> None:
        assert self.km is not None
        await ensure_async(self.km.interrupt_kernel())


_CARD = re.compile(
    r'<div class="nbollama-card".*?<span class="nbollama-badge"[^>]*>(?P<state>[^<]*)</span>'
    r'.*?<div class="nbollama-text"[^>]*>(?P<text>.*?)</div>',
    re.S,
)


_DONE = re.compile(r"<b>(\d+)/(\d+)</b> done")


def _progress_done(html_text: str) -> int:
    """How many prompts a big cell's progress view says are done (0 if it is no such view)."""
    match = _DONE.search(html_text)
    return int(match.group(1)) if match else 0


def _cards(html_text: str) -> list[tuple[str, str]]:
    return [(m["state"], m["text"]) for m in _CARD.finditer(html_text)]


def _texts(html_text: str) -> list[str]:
    return [text for _, text in _cards(html_text)]


def _printed(cell: NotebookNode) -> Any:
    text = "".join(
        o.get("text", "")
        for o in cell.outputs
        if o["output_type"] == "stream" and o["name"] == "stdout"
    )
    return json.loads(text.strip().splitlines()[-1])


def _display_id(client: RecordingClient, cell_index: int) -> str:
    ids = [
        d["display_id"]
        for d in client.displays
        if d["cell"] == cell_index and d["type"] == "display_data"
    ]
    ids = [i for i in ids if i]
    assert len(ids) == 1, f"cell {cell_index} should make one live display, made {ids}"
    return ids[0]


def _states(client: RecordingClient, display_id: str) -> list[list[tuple[str, str]]]:
    """Every state of a display, first to last: per prompt (badge, html text)."""
    return [
        _cards(d["data"]["text/html"])
        for d in client.displays
        if d["display_id"] == display_id and "text/html" in d["data"]
    ]


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[NotebookNode, RecordingClient]:
    tmp = tmp_path_factory.mktemp("magics-notebook")
    kernels = tmp / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    # The kernel must be this venv's Python, whatever `python` means on PATH.
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nbollama tests",
                "language": "python",
                "interrupt_mode": "signal",
            }
        )
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(source, metadata={"tags": tags}) for source, tags in CELLS
    ]
    path = tmp / "magics.ipynb"
    nbformat.write(nb, path)
    nb = nbformat.read(path, as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        client = RecordingClient(
            nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp)}}
        )
        client.execute()
    nbformat.write(nb, path)  # what a user would open afterwards
    return nb, client


def test_foreground_streams_each_prompt(executed: tuple[NotebookNode, RecordingClient]) -> None:
    nb, client = executed
    display_id = _display_id(client, 3)
    states = _states(client, display_id)
    updates = [
        d
        for d in client.displays
        if d["display_id"] == display_id and d["type"] == "update_display_data"
    ]
    assert len(updates) >= 4, f"only {len(updates)} updates for three prompts"
    for prompt in range(3):
        texts = [state[prompt][1] for state in states]
        partial = {
            t
            for t, (badge, _) in zip(texts, (s[prompt] for s in states))
            if badge == "generating" and t
        }
        assert len(partial) >= 2, f"prompt {prompt} streamed in only {len(partial)} distinct states"
        for before, after in zip(texts, texts[1:]):
            assert after.startswith(before), "a prompt's text must only grow"
    final = states[-1]
    assert [badge for badge, _ in final] == ["done", "done", "done"]
    assert all(text for _, text in final)
    # what the notebook keeps is the final state, with each prompt's figures
    html_out = next(o for o in nb.cells[3].outputs if o["output_type"] == "display_data")["data"][
        "text/html"
    ]
    assert _cards(html_out) == final
    assert html_out.count("tok/s") == 3 and html_out.count("TTFT") == 3
    # the cell's value is the Results table
    result = next(o for o in nb.cells[3].outputs if o["output_type"] == "execute_result")
    assert "nbollama-results" in result["data"]["text/html"]


def test_out_holds_results_in_prompt_order(executed: tuple[NotebookNode, RecordingClient]) -> None:
    nb, _ = executed
    rows = _printed(nb.cells[4])
    assert [r[0] for r in rows] == [
        "Write a haiku about GPUs.",
        "The three primary colours are",
        'A JSON object: {"name": "x", "size": {unknown}}',
    ]
    assert all(r[1] in ("length", "stop") and 0 < r[2] <= 96 for r in rows)


def test_background_cells_run_while_other_cells_execute(
    executed: tuple[NotebookNode, RecordingClient],
) -> None:
    nb, client = executed
    while_running = _printed(nb.cells[7])
    held = ["BackgroundGeneration", "BackgroundGeneration"]  # --out holds the job until it is done
    assert while_running == {"jobs": 2, "done": [False, False], "held": held}
    after = _printed(nb.cells[8])
    assert after["n"] == [2, 1] and after["same"] == [True, True] and after["done"] == [True, True]
    assert all(r in ("length", "stop") for r in after["reasons"])
    for cell_index, n_prompts in ((5, 2), (6, 1)):
        display_id = _display_id(client, cell_index)
        updates = [
            d
            for d in client.displays
            if d["display_id"] == display_id and d["type"] == "update_display_data"
        ]
        # the updates came from the background thread while later cells ran
        assert updates and all(d["cell"] > cell_index for d in updates)
        final = _cards(updates[-1]["data"]["text/html"])
        assert [badge for badge, _ in final] == ["done"] * n_prompts
        # JupyterLab applies an update only in the cell whose request it answers: the
        # background thread also sends each one as the cell that made the display
        own = [
            w
            for w in client.wire
            if w["display_id"] == display_id and w["parent"] == client.cell_msg_ids[cell_index]
        ]
        assert own[0]["type"] == "display_data" and len(own) >= 2
        assert [badge for badge, _ in _cards(own[-1]["html"])] == ["done"] * n_prompts
        kept = next(o for o in nb.cells[cell_index].outputs if o["output_type"] == "display_data")
        assert _cards(kept["data"]["text/html"]) == final
        value = next(
            o for o in nb.cells[cell_index].outputs if o["output_type"] == "execute_result"
        )
        assert "BackgroundGeneration" in value["data"]["text/plain"]


def test_interrupt_cancels_and_the_next_cell_generates(
    executed: tuple[NotebookNode, RecordingClient],
) -> None:
    nb, client = executed
    assert client.interrupted_at == 9
    errors = [o for o in nb.cells[9].outputs if o["output_type"] == "error"]
    assert [e["ename"] for e in errors] == ["KeyboardInterrupt"]
    final = _states(client, _display_id(client, 9))[-1]
    assert final[0][0] == "cancelled" and final[0][1], "the partial text stays, marked cancelled"
    state = _printed(nb.cells[10])
    assert state["reason"] == "cancelled" and 0 < state["tokens"] < 2000
    assert state["busy"] == 0 and state["queue"] == 0
    reason, tokens = _printed(nb.cells[12])
    assert reason in ("length", "stop") and tokens > 0


def test_written_notebook_is_valid(executed: tuple[NotebookNode, RecordingClient]) -> None:
    nb, _ = executed
    nbformat.validate(nb)


def test_the_token_view_and_the_choice_stay_in_the_saved_notebook(
    executed: tuple[NotebookNode, RecordingClient],
) -> None:
    """What the file holds is what nbviewer shows: the view is HTML and CSS, no script."""
    nb, _ = executed
    (view,) = [o for o in nb.cells[13].outputs if o["output_type"] == "display_data"]
    page = view["data"]["text/html"]
    assert page.count('class="nbollama-tokenview"') == 1 and "<script" not in page
    assert ".nbtv-t:hover>.nbtv-alts" in page and ".nbtv-t:focus-within>.nbtv-alts" in page
    tokens = re.findall(r'<span class="nbtv-t" tabindex="0"', page)
    assert len(tokens) >= 1 and page.count('role="tooltip"') >= len(tokens)
    assert "perplexity" in view["data"]["text/plain"]
    (choice,) = [o for o in nb.cells[14].outputs if o["output_type"] == "display_data"]
    assert 'class="nbollama-choice"' in choice["data"]["text/html"]
    assert re.search(
        r"choice: (yes|no) \(\d+\.\d%\); (yes|no) \d+\.\d%", choice["data"]["text/plain"]
    )


# -- a 1,000-prompt cell ---------------------------------------------------------------------

N_BIG = 1000
BIG_PROMPTS = [f"Item {i}:" for i in range(N_BIG)]
BIG_CELLS: list[tuple[str, list[str]]] = [
    ("%load_ext nbollama", []),
    ("%nbollama load --parallel 8 --ctx 128", []),
    (f"prompts = [f'Item {{i}}:' for i in range({N_BIG})]", []),
    (  # 3: the big cell
        "%%generate --lines --max-tokens 2 --temperature 0 --out big\n" + "\n".join(BIG_PROMPTS),
        [],
    ),
    (  # 4: the same prompts through engine.generate()
        "import json, sys\nfrom nbollama import current_engine\n"
        "direct = current_engine().generate(prompts, max_tokens=2, temperature=0)\n"
        "print(json.dumps({'n': len(big), 'order': [r.prompt for r in big] == prompts,"
        " 'ok': big.ok, 'differ': [i for i, (a, b) in enumerate(zip(big, direct)) if a.text != b.text]}))",
        [],
    ),
    (  # 5: interrupted by the test once 40 are done
        "%%generate --lines --max-tokens 3 --out cut\n"
        + "\n".join(f"Story {i}:" for i in range(N_BIG)),
        ["interrupt-big", "raises-exception"],
    ),
    (  # 6
        "snap = current_engine().snapshot()\n"
        "print(json.dumps({'n': len(cut), 'ok': sum(r.ok for r in cut),"
        " 'reasons': cut.finish_reasons(), 'busy': snap['busy_slots'], 'queue': snap['queue']['length'],"
        " 'attached': getattr(sys.last_value, 'results', None) is cut}))",
        [],
    ),
    (  # 7: Python's progress bar in a notebook
        "quick = current_engine().generate(prompts[:50], max_tokens=1, progress=True)\nlen(quick)",
        [],
    ),
]


@pytest.fixture(scope="module")
def big_executed(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[NotebookNode, RecordingClient]:
    tmp = tmp_path_factory.mktemp("big-cell")
    kernels = tmp / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nbollama tests",
                "language": "python",
                "interrupt_mode": "signal",
            }
        )
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(source, metadata={"tags": tags}) for source, tags in BIG_CELLS
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        client = RecordingClient(
            nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp)}}
        )
        client.execute()
    return nb, client


def test_a_1000_prompt_cell_keeps_a_small_output(
    big_executed: tuple[NotebookNode, RecordingClient],
) -> None:
    nb, client = big_executed
    stored = len(json.dumps(nb.cells[3].outputs))
    mine = [w for w in client.wire if w["parent"] == client.cell_msg_ids[3]]
    sizes = [w["bytes"] for w in mine]
    print(
        f"1000-prompt cell: stored output {stored} bytes; {len(sizes)} display messages, max {max(sizes)} bytes"
    )
    assert stored < 100_000
    assert max(sizes) < 50_000 and len(sizes) >= 3
    assert all("nbollama-card" not in w["html"] for w in mine)
    assert _progress_done(mine[-1]["html"]) == N_BIG
    result = next(o for o in nb.cells[3].outputs if o["output_type"] == "execute_result")
    assert "990 more rows" in result["data"]["text/html"]


def test_a_1000_prompt_cell_is_engine_generate_on_its_prompts(
    big_executed: tuple[NotebookNode, RecordingClient],
) -> None:
    nb, _ = big_executed
    state = _printed(nb.cells[4])
    assert state["n"] == N_BIG and state["order"] and state["ok"]
    assert state["differ"] == [], f"{len(state['differ'])} texts differ from engine.generate()"


def test_ctrl_c_in_a_1000_prompt_cell_keeps_the_finished_and_frees_the_slots(
    big_executed: tuple[NotebookNode, RecordingClient],
) -> None:
    nb, client = big_executed
    assert client.interrupted_at == 5
    assert [o["ename"] for o in nb.cells[5].outputs if o["output_type"] == "error"] == [
        "KeyboardInterrupt"
    ]
    state = _printed(nb.cells[6])
    assert state["n"] == N_BIG and state["ok"] >= 40 and state["reasons"]["cancelled"] > 500
    assert state["busy"] == 0 and state["queue"] == 0
    assert state["attached"], "the KeyboardInterrupt carries the results (sys.last_value.results)"
    kept = next(o for o in nb.cells[5].outputs if o["output_type"] == "display_data")
    assert "stopped" in kept["data"]["text/html"]


def test_generate_progress_in_a_notebook(
    big_executed: tuple[NotebookNode, RecordingClient],
) -> None:
    nb, _ = big_executed
    view = next(o for o in nb.cells[7].outputs if o["output_type"] == "display_data")
    assert "nbollama-progress" in view["data"]["text/html"]
    assert _progress_done(view["data"]["text/html"]) == 50
    value = next(o for o in nb.cells[7].outputs if o["output_type"] == "execute_result")
    assert value["data"]["text/plain"] == "50"
