"""The teaching notebooks and the checks each one gets.

``test_user_install`` runs every notebook top to bottom on the real model, in
a kernel of a user's own environment (the wheel alone, and ``scripts/setup.sh``),
with sizes cut by ``NBOLLAMA_QUICK=1``. After a notebook's own cells it appends
the notebook's cell of checks below on what it measured (the shape and sanity
of its tables, not exact numbers), run in the same kernel.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CHECKS = {
    "01_quickstart.ipynb": """
assert len(answers) == 4 and all(r.ok for r in answers), answers
assert list(df["prompt"]) == [r.prompt for r in answers]
assert handle.result().ok and handle.result().text
""",
    "02_parallel_sweep.ipynb": """
assert [r.parallel for r in sweep.rows] == PARALLEL
assert all(r.throughput > 0 and r.mean_ttft > 0 and r.peak_memory > 0 for r in sweep.rows)
assert all(r.completion_tokens > 0 for r in sweep.rows)
assert sweep.recommended in PARALLEL
assert sweep.rows[-1].kv_bytes > sweep.rows[0].kv_bytes
import nbollama
assert nbollama.current_engine().parallel in (1, 2)  # --apply switched the engine
""",
    "03_latency_vs_throughput.ipynb": """
assert [r["parallel"] for r in rows] == PARALLEL
assert all(r["throughput tok/s"] > 0 and r["mean latency s"] > 0 for r in rows)
assert len(burst) == N_PROMPTS and max(r.queue_wait for r in burst) > 0
waiting = normal_results[1:]  # the first normal request took the free slot at once
assert urgent_result.queue_wait < min(r.queue_wait for r in waiting)
assert served_before == len(waiting)
""",
    "04_memory.ipynb": """
assert [r["N"] for r in rows] == N_VALUES
assert all(r["_one"] > 0 and r["_n"] > 0 for r in rows)
assert rows[-1]["_one"] < rows[-1]["_n"], rows  # one model with N slots beats N models
assert len(fig.data) == 3 and all(list(t.y) == sorted(t.y) for t in fig.data)  # KV grows with parallel
""",
    "06_shared_prefixes.ipynb": """
assert len(first) == len(questions) and all(r.ok for r in first + rerun + plain)
assert first[0].cached_tokens == 0 and all(r.cached_tokens > 100 for r in first[1:])  # shared, not prefilled
assert all(r.cached_tokens == r.prompt_tokens - 1 for r in rerun)  # the re-run prefills one token each
assert all(r.cached_tokens == 0 for r in plain + plain_again)
assert table.loc["cache: run again", "prefilled"] * 20 < table.loc["no cache: run again", "prefilled"]
assert len(from_a_cell) == len(questions) and from_a_cell.ok
""",
    "07_reproducibility.ipynb": """
assert len(normal_1) == len(prompts) and all(r.ok for r in normal_1 + normal_8 + repro_1 + repro_8)
assert repro_differ == 0
assert [r.token_ids for r in repro_1] == [r.token_ids for r in repro_8]
assert all(c["identical"] for c in checks.values()), checks
assert set(cost.columns) >= {"normal tok/s", "reproducible tok/s"} and (cost["reproducible tok/s"] > 0).all()
""",
    "09_adaptive_parallelism.ipynb": """
assert list(table.index) == list(runs) and (table["tok/s (aggregate)"] > 0).all()
assert all(r.ok for results, _, _ in runs.values() for r in results)
assert "timed at load" in started and started.startswith("parallel="), started
assert all(c["reason"].startswith(f"parallel={c['parallel']} of 16") for c in changes)
assert all(p["parallel"] == 16 for p in runs["static 16"][2]) and all(p["parallel"] == 1 for p in runs["static 1"][2])
assert all(1 <= p["parallel"] <= 16 for p in runs[next(n for n in runs if "adaptive" in n)][2])
""",
    "05_classroom.ipynb": """
assert len(class_answers) == len(questions) and all(r.ok for r in class_answers)
assert len(quiz) == 1 and quiz[0].ok
assert result.finish_reason == "cancelled" and 10 <= result.completion_tokens < 400
""",
    "10_dataset.ipynb": """
assert len(labels) == len(reviews) == N_ROWS and labels.ok, labels
assert labels.row_labels == tuple(reviews.index)  # --each over a DataFrame keeps its row labels
assert list(labelled.index) == list(reviews.index) and list(labelled["review"]) == list(reviews["review"])
assert all(p.endswith(r + "\\nSentiment:") for p, r in zip(labelled["prompt"], reviews["review"]))
assert accuracy > 0.75 and labelled["predicted"].notna().all(), labelled["text"].head()
assert len(labels._repr_html_()) < 20_000  # a summary, not every row
assert len(from_python) == 100 and all(r.ok for r in from_python)
""",
    "11_structured_outputs.ipynb": """
assert len(labels) == len(reviews) == N_REVIEWS and labels.ok, labels
assert set(labelled["choice"]) <= {"positive", "negative"} and labelled["choice"].notna().all()
assert ((labelled["p_positive"] + labelled["p_negative"] - 1).abs() < 1e-6).all()
assert accuracy > 0.7, labelled[["review", "label", "choice", "p_positive"]].head()
assert len(records) == N_PEOPLE and {"name", "age", "city", "parse_error"} <= set(extracted.columns)
assert extracted["parse_error"].isna().mean() >= 0.8, extracted["parse_error"]
assert all(isinstance(r.parsed, dict) and set(r.parsed) == {"name", "age", "city"} for r in records if r.parse_error is None)
assert typed is None or all(type(r.parsed).__name__ == "Person" for r in typed if r.parse_error is None)
import re
assert all(re.fullmatch(r" (19|20)[0-9][0-9]", r.text) for r in years), years.texts
assert len(cost) == 4 and (cost["seconds"] > 0).all() and (cost["ok"] == cost["prompts"]).all(), cost
""",
    "12_logprobs.ipynb": """
assert len(first.logprobs) == first.completion_tokens and all(len(t["top_logprobs"]) == 5 for t in first.logprobs)
top = [sharpness[f"T={t}"].max() for t in TEMPERATURES]
assert top[0] >= top[1] >= top[2] and abs(sharpness["T=0.8"].sum() - 1) < 1e-9, sharpness
assert all(samples[c].sum() == SAMPLES for c in samples.columns)
assert (samples["T=0.2"] > 0).sum() <= (samples["T=1.5"] > 0).sum(), samples
assert 0 <= coin_tosses["margin"].iloc[0] == margins["margin"].min() <= 1
assert perplexity.loc["a plain sentence", "prompt perplexity"] < perplexity.loc["letters at random", "prompt perplexity"]
assert all(r.prompt_logprobs[0] is None and r.logprobs and r.perplexity >= 1 for r in viewed)
""",
    "13_kv_precision.ipynb": """
assert list(sizes.index) == TYPES and sizes.loc["q8_0", "vs f16"] <= 0.55 and sizes.loc["q4_0", "vs f16"] < sizes.loc["q8_0", "vs f16"]
assert (arithmetic["q8_0"] >= 1.8 * arithmetic["f16"]).all() and (arithmetic["q4_0"] >= arithmetic["q8_0"]).all(), arithmetic
assert same_budget.loc["q8_0", "slots"] >= 1.8 * same_budget.loc["f16", "slots"] and (same_budget["tok/s"] > 0).all()
assert same_budget.loc["q8_0", "KV allocated (MiB)"] <= 1.05 * same_budget.loc["f16", "KV allocated (MiB)"], same_budget
assert [r.kv_type for r in quality.rows] == TYPES and quality.row("f16").mean_kl == 0 <= quality.row("q8_0").mean_kl
assert result.recommended_kv_type in TYPES and result.quality is not None and len(result.kv_types) >= 2
import nbollama
assert nbollama.current_engine().kv_type == "q8_0" and nbollama.current_engine().parallel == 8
""",
    "15_durable_runs.ipynb": """
assert N_ROWS // 2 <= finished < N_ROWS and len(cut) == len(resumed) == N_ROWS
assert sum(r.cached for r in resumed) == finished and same == finished and resumed.ok
assert [r.prompt for r in resumed] == [r.prompt for r in cut]
assert not any(r.cached for r in [*plain, *written]) and all(r.cached for r in replayed)
assert replayed_s < written_s and replayed_s < plain_s
""",
    "14_compare_models.ipynb": """
assert grown < wide.kv_bytes / 2**20 + 64 and grown < weights_mib, (grown, weights_mib, wide.kv_bytes)
assert [r.model for r in side] == ["small"] * 4 + ["wide"] * 4 and list(side.compare().columns) == ["small", "wide"]
assert one[0].model == "wide" and len(one) == 1
assert set(sweeps) == {"small", "wide"} and all(s.recommended in PARALLEL for s in sweeps.values())
assert list(best["KV type"]) == ["f16", "q8_0"]
assert after.model == "wide" and after.ok and list(nbollama.session.engines()) == ["wide"]
""",
    "16_evaluate.ipynb": """
assert scores.engines == ["f16"] and set(scores.table.task) == {"nbollama_mc", "nbollama_gen", "nbollama_ppl"}
acc, stderr = scores.metric("nbollama_mc", "acc")
assert acc > 0.5 and 0 <= stderr < 0.25 and len(mc) == LIMIT and abs(mc["correct"].mean() - acc) < 1e-9, mc
assert ((mc["probs"].map(sum) - 1).abs() < 1e-9).all() and all(p in o for p, o in zip(mc["pick"], mc["options"]))
assert len(gen) == min(LIMIT, 30) and scores.metric("nbollama_ppl", "word_perplexity")[0] > 1
assert [t.name for t in scores.calibration().data] == ["calibrated", "f16"]
assert kv.engines == ["f16", "q8"] and list(kv.compare().columns.get_level_values(1)) == ["f16", "q8"] * 2
a, b = (kv.metric("nbollama_mc", "acc", e) for e in ("f16", "q8"))
assert abs(a[0] - b[0]) <= 2 * max(a[1], b[1]) + 1e-9 and same_pick >= 0.8, (a, b, same_pick)
assert quick.requests["f16"] == 6 and len(quick.samples) == 6
""",
    "08_tune_a_server.ipynb": """
assert len(first) == 4 and all(r.ok and r.text for r in first)
assert [r.concurrency for r in sweep.rows] == CONCURRENCY
assert all(r.throughput > 0 and r.ttft_p50 > 0 and r.errors == 0 for r in sweep.rows)
assert sweep.kind == "llama-server" and sweep.server_parallel == 4
assert sweep.inferred_parallel == 4, (sweep.inference, [r.first_wave for r in sweep.rows])
assert f"-np {sweep.recommended}" in sweep.setting
import nbollama
assert nbollama.current_engine() is None and local_server.process is None  # disconnected, server stopped
""",
}


def test_every_example_has_checks() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.ipynb")) == sorted(CHECKS)


def test_examples_are_committed_without_outputs() -> None:
    for path in EXAMPLES.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"
