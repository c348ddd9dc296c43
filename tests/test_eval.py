"""nbollama as an lm-evaluation-harness backend, on the real bundled model.

Each request kind is checked against a reference computed here from the
engine's own ``prompt_logprobs`` (the summed log-probabilities of the tokens
after the context's), within the batch variance measured here; ``is_greedy``
against greedy generation; rolling windows on a text longer than a slot;
``generate_until`` with stop strings against ``engine.generate``; a real
llama-server; the refusals (protocol fakes, nothing sent); and
``%nbollama eval`` in a real kernel, its outputs bounded. Nothing reaches the
Hugging Face hub: the tasks are local JSON, and the hub is switched off.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
import remote_fakes
from conftest import REPO, noisy_outputs
from IPython.core.error import UsageError
from lm_eval.api.instance import Instance

import nbollama
from nbollama import Engine
from nbollama._eval_requests import (
    SCORE_PARAMS,
    generation_params,
    plan_loglikelihood,
    rolling_windows,
    split_context,
)
from nbollama.eval import NbollamaLM, _windows, evaluate
from nbollama.exceptions import InvalidParamsError
from nbollama.llama_server import LlamaServer, find_binary
from nbollama.magics._parse_nbollama import EvalCall, parse_nbollama
from nbollama.remote import connect

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # belt and braces: the tasks are local anyway
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    (
        "Question: What color is the sky on a clear day?\nAnswer:",
        [" blue", " green", " red", " brown"],
    ),
    (
        "Question: How many legs does a dog have?\nAnswer:",
        [" two", " four", " six and a half", " none"],
    ),
    ("Question: Which animal says moo?\nAnswer:", [" a cow", " a duck", " a horse", " a cat"]),
]
LONG_TEXT = json.loads((REPO / "examples" / "data" / "ppl.jsonl").read_text().splitlines()[0])[
    "text"
]


def _instances(kind: str, args: list[tuple[Any, ...]], task: str = "t") -> list[Instance]:
    return [Instance(kind, {}, a, i, (task, i, 1)) for i, a in enumerate(args)]


def _reference(
    engine: Engine, pairs: list[tuple[str, str]], *, solo: bool
) -> list[tuple[float, int]]:
    """Each continuation's summed log-probability from prompt_logprobs of context + continuation:
    the tokens after the context's own (counted by the tokenizer), and how many they are."""
    prompts = [c + x for c, x in pairs]
    results = (
        [engine.generate([p], **SCORE_PARAMS)[0] for p in prompts]
        if solo
        else engine.generate(prompts, **SCORE_PARAMS)
    )
    out = []
    for (context, _), result in zip(pairs, results):
        assert result.prompt_logprobs is not None
        after = result.prompt_logprobs[len(engine.tokenize(context)) :]
        out.append((math.fsum(e["logprob"] for e in after if e is not None), len(after)))
    return out


# -- the mapping alone ------------------------------------------------------------------------------


def test_contexts_group_into_one_choices_request_and_the_rest_fall_back() -> None:
    pairs = [
        ("Q: sky?\nA:", " blue"),
        ("Q: sky?\nA:", " green"),
        ("Q: sky?\nA:", " blue"),  # asked twice: scored once
        ("The capital of France is", " Paris"),  # one continuation: prompt log-probabilities
        ("2+2=", "4"),  # no space of its own: choices would add one
        ("2+2=", "5"),
        ("Answer: ", "yes"),  # the context's space moves to the continuation
        ("Answer: ", "no"),
    ]
    asks, reads = plan_loglikelihood(pairs, ["t"] * len(pairs), choices=True)
    assert [a.prompt for a in asks] == [
        "Q: sky?\nA:",
        "The capital of France is Paris",
        "2+2=4",
        "2+2=5",
        "Answer:",
    ]
    assert asks[0].params["choices"] == [" blue", " green"] and asks[4].params["choices"] == [
        " yes",
        " no",
    ]
    assert reads[0] == reads[2] and reads[1].option == " green"
    assert reads[3].option is None and reads[3].start == len("The capital of France is")
    assert split_context("Answer:  ", "x") == ("Answer:", "  x")
    remote, _ = plan_loglikelihood(
        pairs, ["t"] * len(pairs), choices=False
    )  # a server: all by prompt
    assert len(remote) == 7 and all("choices" not in a.params for a in remote)


def test_generation_keywords_map_and_unknown_ones_are_refused() -> None:
    greedy = generation_params(
        {"until": ["\n", ""], "max_gen_toks": 7, "do_sample": False, "temperature": 0.7}, 256
    )
    assert greedy == {"max_tokens": 7, "stop": ["\n"], "temperature": 0.0}
    sampled = generation_params({"until": ".", "do_sample": True, "top_p": 0.9, "seed": 3}, 256)
    assert sampled == {
        "max_tokens": 256,
        "stop": ["."],
        "top_p": 0.9,
        "seed": 3,
        "temperature": 1.0,
    }
    with pytest.raises(InvalidParamsError, match="num_beams"):
        generation_params({"num_beams": 4}, 256)


def test_the_eval_line_is_checked_before_anything_runs(tmp_path: Path) -> None:
    call = parse_nbollama(
        f"eval a,b c --limit 0.5 --num-fewshot 0 --include-path {tmp_path} --engine x,y --out r"
    )
    assert call == EvalCall(("a", "b", "c"), 0.5, 0, (str(tmp_path),), ("x", "y"), "r")
    for line, words in [
        ("eval", "required: TASKS"),
        ("eval t --limit 0", "--limit"),
        ("eval t --num-fewshot -1", "--num-fewshot"),
        ("eval t --include-path /no/such/folder", "is not a folder"),
        ("eval t --out 2x", "not a Python variable"),
    ]:
        with pytest.raises(UsageError, match=words) as caught:
            parse_nbollama(line)
        assert "\n" not in str(caught.value)


# -- each request kind on the real model --------------------------------------------------------------------


def test_loglikelihood_matches_prompt_logprobs_within_the_batch_variance(
    idle_engine: Engine,
) -> None:
    pairs = [(c, o) for c, options in QUESTIONS for o in options]
    pairs += [("The capital of France is", " Paris"), ("2+2=", "4"), ("2+2=", "5")]
    lm = NbollamaLM(idle_engine, progress=False)
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    assert lm.score_route() == "choices" and lm.requests_sent == len(QUESTIONS) + 3
    batched = _reference(idle_engine, pairs, solo=False)
    solo = _reference(idle_engine, pairs[::3], solo=True)  # the same requests, other batches
    variance = max(abs(a[0] - b[0]) for a, b in zip(batched[::3], solo))
    bound = max(2 * variance, 1e-3)
    print(
        f"loglikelihood: batch variance {variance:.2e} nats; choices vs reference within {bound:.2e}"
    )
    for (context, cont), (value, _), (ref, n) in zip(pairs, got, batched):
        assert n >= 1 and abs(value - ref) <= bound, (context, cont, value, ref)
    multi = [value for (_, cont), (value, _) in zip(pairs, got) if cont == " six and a half"]
    assert multi and multi[0] < min(v for (_, c), (v, _) in zip(pairs, got) if c == " four")


def test_is_greedy_agrees_with_greedy_generation(idle_engine: Engine) -> None:
    contexts = [QUESTIONS[0][0], QUESTIONS[2][0], "The capital of France is"]
    generated = idle_engine.generate(contexts, max_tokens=2, temperature=0, logprobs=2)
    pairs = []
    for context, result in zip(contexts, generated):
        assert result.logprobs is not None and len(result.logprobs) == 2
        first, second = result.logprobs
        greedy = first["token"] + second["token"]
        other = first["token"] + second["top_logprobs"][1]["token"]  # the runner-up second token
        pairs += [(context, greedy), (context, other)]
    answers = NbollamaLM(idle_engine, progress=False).loglikelihood(
        _instances("loglikelihood", pairs)
    )
    assert [g for _, g in answers] == [True, False] * len(contexts), list(zip(pairs, answers))


def test_rolling_windows_cover_a_text_longer_than_a_slot_once(
    model_path: Path, idle_engine: Engine
) -> None:
    text = " ".join(LONG_TEXT.split()[:45])
    with Engine.load(model_path, parallel=2, ctx=32, share_weights_with=idle_engine) as small:
        tokens = small.tokenize(text, add_special=False)
        windows = rolling_windows(
            text, lambda t: small.tokenize(t, add_special=False), small.ctx - 3, _windows
        )
        assert len(windows) >= 2 and len(tokens) > small.ctx
        scored = small.generate([w.text for w in windows], **SCORE_PARAMS)
        covered = []  # the scored bytes of every window, as offsets into the text
        at = 0
        for window, result in zip(windows, scored):
            assert result.ok and result.prompt_tokens < small.ctx
            begin = text.encode().find(window.text.encode(), max(0, at - len(window.text.encode())))
            covered.append((begin + window.score_from, begin + len(window.text.encode())))
            at = covered[-1][1]
        assert covered[0][0] == 0 and covered[-1][1] == len(text.encode())
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), (
            covered
        )  # each byte scored once
        total = NbollamaLM(small, progress=False).loglikelihood_rolling(
            _instances("loglikelihood_rolling", [(text,)])
        )[0]
    whole = idle_engine.generate([text], **SCORE_PARAMS)[0]  # the whole text in one slot of 512
    assert whole.prompt_logprobs is not None
    full = math.fsum(e["logprob"] for e in whole.prompt_logprobs if e is not None)
    per_token = (total - full) / len(tokens)
    print(
        f"rolling: {len(windows)} windows, {total:.2f} nats against {full:.2f} with the whole text in view"
    )
    assert -1.0 < per_token < 0.5  # less context costs a little per token, never most of it
    short = NbollamaLM(idle_engine, progress=False).loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(text,)])
    )
    assert abs(short[0] - full) < 1e-3  # a text that fits is one prompt: the same sum


def test_generate_until_stops_at_lm_evals_strings(idle_engine: Engine) -> None:
    contexts = [
        "Q: What is the capital of France?\nA:",
        "Count: 1, 2, 3,",
        "The colours of the rainbow are",
    ]
    kwargs = [
        {"until": ["\n"], "max_gen_toks": 16, "do_sample": False},
        {"until": [","], "max_gen_toks": 12},
        {"until": ["."], "max_gen_toks": 5},
    ]
    texts = NbollamaLM(idle_engine, progress=False).generate_until(
        _instances("generate_until", list(zip(contexts, kwargs)))
    )
    handles = [  # the same requests, queued together as the model queues them
        idle_engine.submit(c, temperature=0, stop=k["until"], max_tokens=k["max_gen_toks"])
        for c, k in zip(contexts, kwargs)
    ]
    direct = [h.result().text for h in handles]
    assert texts == direct and all(t for t in texts)
    assert all(k["until"][0] not in t for t, k in zip(texts, kwargs)), texts


# -- servers -------------------------------------------------------------------------------------------------


def test_servers_that_cannot_score_are_refused_before_anything_is_sent() -> None:
    for kind in ("ollama", "openai"):
        with remote_fakes.running(kind) as fake:
            remote = connect(fake.url, kind=kind)
            try:
                lm = NbollamaLM(remote, progress=False)
                with pytest.raises(
                    InvalidParamsError, match="^loglikelihood: not possible on this engine: "
                ) as caught:
                    lm.loglikelihood(
                        _instances(
                            "loglikelihood", [("The sky is", " blue"), ("The sky is", " red")]
                        )
                    )
                assert "\n" not in str(caught.value)
                with pytest.raises(
                    InvalidParamsError,
                    match="^loglikelihood_rolling: not possible on this engine: ",
                ):
                    lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [("Some text.",)]))
                with pytest.raises(InvalidParamsError, match="num_beams"):
                    lm.generate_until(
                        _instances("generate_until", [("Hi", {"until": ["\n"], "num_beams": 2})])
                    )
                assert fake.books.requests == [], f"{kind}: something was sent"
            finally:
                remote.close()


def test_a_vllm_server_scores_from_its_echoed_prompt_logprobs() -> None:
    with remote_fakes.running("vllm", tokens=1) as fake:
        remote = connect(fake.url, kind="vllm")
        try:
            lm = NbollamaLM(remote, progress=False)
            answers = lm.loglikelihood(
                _instances("loglikelihood", [("The sky is", " blue"), ("The sky is", " very red")])
            )
            assert lm.score_route() == "prompt"
            # the fake's n-th prompt token has log-probability -1 - 0.1 n (remote_wire.legacy)
            assert answers[0][0] == pytest.approx(-1.3) and answers[0][1]
            assert answers[1][0] == pytest.approx(-1.3 - 1.4) and answers[1][1]
            assert [r["body"].get("echo") for r in fake.books.requests] == [True, True]
        finally:
            remote.close()


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[LlamaServer]:
    if find_binary() is None:
        pytest.fail(
            "llama-server is not built: run `python -m nbollama.llama_server build` once",
            pytrace=False,
        )
    with LlamaServer(
        model_path, ["-np", "2", "-c", "1024"], env={"OMP_WAIT_POLICY": "PASSIVE"}
    ) as running:
        yield running


def test_a_real_llama_server_generates_and_refuses_scoring_in_one_line(server: LlamaServer) -> None:
    remote = connect(server.url)
    try:
        lm = NbollamaLM(remote, progress=False)
        with pytest.raises(InvalidParamsError, match="llama-server") as caught:
            lm.loglikelihood(_instances("loglikelihood", [("The sky is", " blue")]))
        assert "\n" not in str(caught.value) and remote.snapshot()["totals"]["submitted"] == 0
        contexts = ["The capital of France is", "One, two, three,"]
        kwargs = {"until": [".", "\n"], "max_gen_toks": 8}
        texts = lm.generate_until(_instances("generate_until", [(c, kwargs) for c in contexts]))
        assert len(texts) == 2 and all(t and "." not in t and "\n" not in t for t in texts), texts
        assert remote.snapshot()["totals"]["completed"] == 2
    finally:
        remote.close()


# -- the task runner and the magic ----------------------------------------------------------------------------


def _tiny_tasks(folder: Path) -> Path:
    """A user's own task folder: three tiny tasks over JSON beside their YAMLs."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": "What color is grass?", "choices": ["green", "purple", "orange"], "answer": 0},
        {
            "question": "How many days are in a week?",
            "choices": ["three", "seven", "forty"],
            "answer": 1,
        },
        {"question": "Which animal barks?", "choices": ["a fish", "a dog", "a snail"], "answer": 1},
    ]
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "gen.jsonl").write_text(
        "".join(
            json.dumps({"q": q, "a": a}) + "\n" for q, a in [("France", "Paris"), ("Italy", "Rome")]
        )
    )
    (folder / "ppl.jsonl").write_text(
        "".join(
            json.dumps({"text": t}) + "\n"
            for t in ["The cat sat on the mat.", "Rain fell on the quiet town."]
        )
    )
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_kwargs:\n  data_files:\n    test: mc.jsonl\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n" + common
    )
    (folder / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_kwargs:\n  data_files:\n    test: gen.jsonl\noutput_type: generate_until\n"
        'doc_to_text: "The capital of {{q}} is"\ndoc_to_target: "{{a}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 4\n  do_sample: false\n'
        'metric_list:\n  - metric: exact_match\n    ignore_case: true\n    regexes_to_ignore: ["\\\\s"]\n'
        + common
    )
    (folder / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\ndataset_kwargs:\n  data_files:\n    test: ppl.jsonl\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        + common
    )
    return folder


def test_evaluate_runs_a_users_task_folder_with_the_hub_off(
    idle_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _tiny_tasks(tmp_path / "tasks")
    monkeypatch.chdir(REPO)  # data_files are read beside the YAML, not from here
    results = evaluate(["tiny_mc", "tiny_ppl"], engine=idle_engine, include_path=str(folder))
    acc, stderr = results.metric("tiny_mc", "acc")
    assert 0 <= acc <= 1 and stderr >= 0 and results.requests[results.engines[0]] == 3 + 2
    samples = results.samples
    mc = samples[samples.task == "tiny_mc"]
    assert list(mc.doc_id) == [0, 1, 2] and list(mc.gold) == ["green", "seven", "a dog"]
    assert all(abs(sum(p) - 1) < 1e-9 for p in mc.probs) and (mc.confidence >= 1 / 3).all()
    assert list(mc.correct) == [p == g for p, g in zip(mc.pick, mc.gold)]
    assert math.isclose(acc, mc.correct.mean())
    assert len(results.calibration().data) == 2  # the diagonal and the engine
    with pytest.raises(InvalidParamsError, match="tiny_nope.*there: tiny_gen, tiny_mc, tiny_ppl"):
        evaluate(["tiny_nope"], engine=idle_engine, include_path=str(folder))


def test_without_lm_eval_the_magic_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbollama.magics._eval import NO_EVAL_EXTRA, run_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "nbollama.eval")
    with pytest.raises(UsageError) as caught:
        run_eval(None, EvalCall(("tiny_mc",)))
    assert str(caught.value) == NO_EVAL_EXTRA and "pip install 'nbollama[eval]'" in NO_EVAL_EXTRA
    with pytest.raises(ImportError, match=r"pip install 'nbollama\[eval\]'"):
        import nbollama.eval  # noqa: F401


@pytest.mark.notebook
def test_the_eval_magic_in_a_real_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_magics_notebook import RecordingClient

    folder = _tiny_tasks(tmp_path / "tasks")
    cells = [
        "%load_ext nbollama",
        "%nbollama load --as f16 --parallel 4 --ctx 256\n%nbollama load --as q8 --parallel 4 --ctx 256 --kv-type q8_0",
        f"%nbollama eval tiny_mc,tiny_gen,tiny_ppl --include-path {folder} --engine f16,q8 --out scores",
        "import json\nframe = scores.compare()\nmc = scores.samples.query('task == \"tiny_mc\"')\n"
        "print(json.dumps({'engines': scores.engines, 'rows': len(scores.table), 'cols': list(map(str, frame.columns)),"
        " 'mc': len(mc), 'traces': len(scores.calibration().data), 'log': len(scores.log)}))",
        "%nbollama eval tiny_mc --include-path {folder} --engine nope".replace(
            "{folder}", str(folder)
        ),
    ]
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nbollama tests",
                "language": "python",
                "env": {"PYTHONPATH": str(REPO), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
            }
        )
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(c, metadata={"tags": ["raises-exception"] if "nope" in c else []})
        for c in cells
    ]
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    client = RecordingClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    usage = "cell 4: stderr: UsageError: %nbollama eval --engine: no engine named 'nope'; loaded: f16, q8\n"
    assert noisy_outputs(nb) == [usage]  # a bad --engine gets one line; nothing else anywhere
    state = json.loads(
        "".join(o.get("text", "") for o in nb.cells[3].outputs).strip().splitlines()[-1]
    )
    assert state["engines"] == ["f16", "q8"] and state["mc"] == 6 and state["traces"] == 3
    assert state["cols"] == [
        "('value', 'f16')",
        "('value', 'q8')",
        "('stderr', 'f16')",
        "('stderr', 'q8')",
    ]
    assert state["log"] > 0  # lm-eval logged: captured, not shown
    eval_cell = nb.cells[2].outputs
    views = [o for o in eval_cell if o["output_type"] == "display_data"]
    assert (
        len(views) == 1 and "f16: 7 requests" in views[0]["data"]["text/plain"]
    )  # the view's last state
    value = next(o for o in eval_cell if o["output_type"] == "execute_result")
    assert "tiny_ppl" in value["data"]["text/html"] and "±" in value["data"]["text/html"]
    mine = [w for w in client.wire if w["parent"] == client.cell_msg_ids[2]]
    sizes = [w["bytes"] for w in mine]
    assert len(sizes) >= 3 and max(sizes) < 50_000 and len(json.dumps(eval_cell)) < 100_000, sizes
    assert any(
        "nbollama-progress" in w["html"] for w in mine
    )  # the big-cell view while requests ran


def test_nbollama_is_registered_with_lm_eval() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("nbollama") is NbollamaLM and nbollama.eval.INSTALL_HINT
