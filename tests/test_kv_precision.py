"""KV-cache precision on the real model: options, memory, quality, and the sweep's recommendation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nbollama import Engine, InvalidParamsError, memory, session
from nbollama._api.kvcache import server_kv_words
from nbollama.bench import (
    KVQualityResult,
    KVQualityRow,
    SweepRow,
    kv_quality,
    recommend_kv,
    sweep,
)
from nbollama.engine import LoadOptions

SYSTEM = "You are a careful assistant for a chemistry class. Answer briefly and precisely. " * 12
QUESTIONS = ("What is pH?", "What is a mole?", "Why does ice float?")
PROMPTS = ["The capital of France is", "Water boils at", "The three primary colours are", "Once upon a time"]


# -- checked before anything loads ------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kv_type": "q9_0"}, r"kv_type='q9_0': must be one of .*q8_0"),
        ({"kv_type": 8}, "kv_type=8"),
        ({"kv_type_v": "fp8"}, "kv_type_v='fp8'"),
        ({"kv_type": "q8_0", "flash_attn": False}, r"kv_type='q8_0' quantises V.*flash_attn=False"),
        (
            {"kv_type": "f16", "kv_type_v": "q4_0", "flash_attn": False},
            r"kv_type_v='q4_0' quantises V.*kv_type_v='f16'",
        ),
    ],
)
def test_bad_kv_options_are_one_line_errors_before_any_load(options: dict, match: str) -> None:
    with pytest.raises(InvalidParamsError, match=match) as caught:
        Engine.load("/nonexistent/model.gguf", **options)  # the check runs before the path is read
    assert "\n" not in str(caught.value)


def test_a_quantised_k_alone_needs_no_flash_attention() -> None:
    options = LoadOptions.check(kv_type="q8_0", kv_type_v="f16", flash_attn=False)
    assert (options.kv_type, options.kv_type_v, options.flash_attn) == ("q8_0", "f16", False)


# -- what llama.cpp allocates -----------------------------------------------------------------


def test_q8_0_allocates_at_most_055x_of_f16_and_the_engine_says_so(engine: Engine) -> None:
    with engine.spawn(parallel=4, ctx=512, kv_type="f16") as f16, engine.spawn(
        parallel=4, ctx=512, kv_type="q8_0"
    ) as q8, engine.spawn(parallel=4, ctx=512, kv_type="q4_0") as q4:
        assert (f16.kv_type, q8.kv_type, q4.kv_type) == ("f16", "q8_0", "q4_0")
        assert q8.kv_bytes <= 0.55 * f16.kv_bytes
        assert q4.kv_bytes <= 0.30 * f16.kv_bytes
        assert q8.flash_attn  # "auto" became flash attention, which a quantised V needs
        assert "kv=" in q8.summary and "(q8_0)" in q8.summary
        snap = q8.snapshot()
        assert snap["memory"]["kv_type"] == "q8_0" and snap["memory"]["kv_bytes"] == q8.kv_bytes
        assert "(q8_0)" in snap["memory"]["kv_estimate"]
        # the per-slot figure is llama.cpp's own, from a probe context, and matches the real allocation
        assert q8.kv_bytes_per_slot() == pytest.approx(q8.kv_bytes / 4, rel=0.01)
        assert q8.generate(PROMPTS[:2], max_tokens=6, temperature=0.0)[0].ok


def test_k_and_v_can_differ_and_k_alone_runs_without_flash_attention(model_path: Path) -> None:
    with Engine.load(
        model_path, parallel=2, ctx=256, kv_type="q8_0", kv_type_v="f16", flash_attn=False
    ) as engine:
        assert engine.kv_type == "K q8_0 / V f16" and engine.flash_attn is False
        assert engine.generate(PROMPTS[:1], max_tokens=6, temperature=0.0)[0].completion_tokens > 0


def test_kv_per_slot_gives_each_type_and_a_fixed_budget_holds_18x_the_q8_0_slots(engine: Engine) -> None:
    sizes = memory.kv_per_slot(engine, ("f16", "q8_0", "q4_0"), ctx=2048)
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"]
    budget = 16 * sizes["f16"]
    f16_slots = memory.slots_within(budget, sizes["f16"])
    q8_slots = memory.slots_within(budget, sizes["q8_0"])
    assert f16_slots == 16 and q8_slots >= 1.8 * f16_slots


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
def test_auto_parallel_counts_slots_of_the_chosen_type(
    engine: Engine, kv_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    per_slot = engine.kv_bytes_per_slot(kv_type, ctx=2048)
    # the memory left for the KV cache is 3 f16 slots: more slots fit as the type shrinks
    f16_slot = engine.kv_bytes_per_slot("f16", ctx=2048)
    shared = engine._model.n_vocab * 4 * 8 + 512 * engine._model.n_embd * 4 * 16
    monkeypatch.setattr(memory, "free_memory", lambda on_gpu: (3 * f16_slot + shared, "available RAM"))
    with engine.spawn(parallel="auto", ctx=2048, kv_type=kv_type) as auto:
        expected = min(4, 3 * f16_slot // per_slot)
        assert auto.parallel == expected
        assert f"of {kv_type} KV each" in auto.parallel_reason
    with engine.spawn(parallel="adaptive", ctx=2048, kv_type=kv_type) as adaptive:
        assert adaptive.parallel_max == min(8, 3 * f16_slot // per_slot)


# -- the engine's modes keep working with a quantised cache ------------------------------------


def test_reproducible_mode_with_q8_0_is_independent_of_the_batch(model_path: Path) -> None:
    needle = "Explain why the sky is blue, in the voice of a pirate."
    with Engine.load(model_path, parallel=1, ctx=256, reproducible=True, kv_type="q8_0") as alone:
        expected = alone.generate([needle], max_tokens=24, temperature=0.0, cache=False)[0].token_ids
    with Engine.load(model_path, parallel=4, ctx=256, reproducible=True, kv_type="q8_0") as four:
        crowd = four.generate([*PROMPTS[:3], needle], max_tokens=24, temperature=0.0, cache=False)
    assert crowd[-1].token_ids == expected and len(expected) >= 12


def test_the_prefix_cache_with_q8_0_reuses_and_changes_nothing(model_path: Path) -> None:
    prompts = [f"{SYSTEM}Question: {q}\nAnswer:" for q in QUESTIONS]
    options = {"parallel": 2, "ctx": 512, "reproducible": True, "kv_type": "q8_0"}
    with Engine.load(model_path, prefix_cache=False, **options) as off:
        expected = [r.token_ids for r in off.generate(prompts, max_tokens=12, temperature=0.0, cache=False)]
    with Engine.load(model_path, **options) as on:
        first = on.generate(prompts, max_tokens=12, temperature=0.0, cache=False)
        again = on.generate(prompts, max_tokens=12, temperature=0.0, cache=False)
    assert [r.token_ids for r in first] == expected == [r.token_ids for r in again]
    assert sum(r.cached_tokens for r in first + again) > 0


# -- quality and the sweep ---------------------------------------------------------------------


def test_kv_quality_measures_each_type_against_f16(engine: Engine) -> None:
    result = kv_quality(engine, PROMPTS[:3], kv_types=("q8_0", "q4_0"), max_tokens=12, progress=False)
    assert [r.kv_type for r in result.rows] == ["f16", "q8_0", "q4_0"]
    f16, q8, q4 = result.rows
    assert f16.mean_kl == 0.0 and f16.greedy_agreement == 1.0 and f16.perplexity_delta == 0.0
    for row in (q8, q4):
        assert math.isfinite(row.mean_kl) and row.mean_kl >= 0.0 and row.max_kl >= row.mean_kl
        assert 0.0 <= row.greedy_agreement <= 1.0 and 0.0 <= row.top1_agreement <= 1.0
        assert math.isfinite(row.perplexity) and row.perplexity > 1.0
    assert q8.kv_ratio <= 0.55 and q4.kv_ratio < q8.kv_ratio
    assert q8.mean_kl < q4.mean_kl  # fewer bits, further from f16
    frame = result.to_pandas()
    assert list(frame.index) == ["f16", "q8_0", "q4_0"] and "mean_kl" in frame.columns
    assert "mean KL" in result._repr_html_() and result.figure().data


def test_kv_quality_refuses_bad_arguments_before_running(engine: Engine) -> None:
    with pytest.raises(InvalidParamsError, match="kv_types"):
        kv_quality(engine, PROMPTS, kv_types=("q9",), progress=False)
    with pytest.raises(InvalidParamsError, match="prompts"):
        kv_quality(engine, [], progress=False)


def test_a_sweep_over_kv_types_recommends_a_type_and_its_server_settings(engine: Engine) -> None:
    result = sweep(
        engine, parallel=(1, 2), n_prompts=4, max_tokens=8, kv_types=["q8_0"], ctx=256, progress=False
    )
    assert [(r.kv_type, r.parallel) for r in result.rows] == [
        ("f16", 1), ("f16", 2), ("q8_0", 1), ("q8_0", 2)
    ]  # fmt: skip
    assert result.quality is not None and result.recommended_kv_type in ("f16", "q8_0")
    q8_rows = [r for r in result.rows if r.kv_type == "q8_0"]
    f16_rows = [r for r in result.rows if r.kv_type == "f16"]
    assert all(q.kv_bytes <= 0.55 * f.kv_bytes for q, f in zip(q8_rows, f16_rows))
    assert result.to_pandas().index.names == ["kv_type", "parallel"]
    assert "Recommendation" in result._repr_html_() and len(result.figure().data) == 2
    assert bool(result.server_settings()) == (result.recommended_kv_type == "q8_0")


def _row(kv_type: str, parallel: int, throughput: float, kv_bytes: int) -> SweepRow:
    return SweepRow(parallel, 8, 64, 1.0, throughput, 0.1, 0.2, throughput / parallel, 0, "host", kv_bytes, kv_type)


def _quality(kl: dict[str, float]) -> KVQualityResult:
    return KVQualityResult(
        [KVQualityRow(t, 1, 1.0, 1.0, value, value, 1.0, 10.0, 0.0) for t, value in {"f16": 0.0, **kl}.items()]
    )


def test_recommend_kv_weighs_throughput_against_the_measured_quality() -> None:
    rows = [
        _row("f16", 4, 100.0, 4 * 36), _row("f16", 8, 102.0, 8 * 36),
        _row("q8_0", 4, 98.0, 4 * 19), _row("q8_0", 8, 99.0, 8 * 19),
        _row("q4_0", 4, 97.0, 4 * 10), _row("q4_0", 8, 98.0, 8 * 10),
    ]  # fmt: skip
    kv, parallel, why = recommend_kv(rows, _quality({"q8_0": 0.001, "q4_0": 0.05}))
    assert (kv, parallel) == ("q8_0", 4)
    assert "q4_0: mean KL 0.0500 > 0.01" in why and "the slots in the same memory" in why
    kv, _, why = recommend_kv(rows, _quality({"q8_0": 0.02, "q4_0": 0.05}))
    assert kv == "f16" and "cost too much" in why
    slow = [r if r.kv_type != "q8_0" else _row("q8_0", r.parallel, 50.0, r.kv_bytes) for r in rows[:4]]
    kv, _, why = recommend_kv(slow, _quality({"q8_0": 0.001}))
    assert kv == "f16" and "0.50x the throughput" in why


def test_server_words_name_each_servers_kv_setting() -> None:
    ollama = server_kv_words("ollama", "q8_0", "q8_0")
    assert 'Environment="OLLAMA_KV_CACHE_TYPE=q8_0"' in ollama
    assert 'Environment="OLLAMA_FLASH_ATTENTION=1"' in ollama and "systemctl edit ollama.service" in ollama
    assert "no Ollama form" in server_kv_words("ollama", "q8_0", "f16")
    assert server_kv_words("llama-server", "q4_0", "q4_0", model="m.gguf") == (
        "llama-server -m m.gguf --cache-type-k q4_0 --cache-type-v q4_0 -fa on"
    )
    assert "--kv-cache-dtype fp8" in server_kv_words("vllm", "q8_0", "q8_0")
    assert "no q4_0 KV cache" in server_kv_words("vllm", "q4_0", "q4_0")


# -- the magics --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("load --kv-type q8_0 --flash-attn off", r"%nbollama load: --kv-type 'q8_0' quantises V.*--flash-attn off turns it off: pass --flash-attn on \(or 'auto'\)"),
        ("load --kv-type q9", r"%nbollama load: --kv-type 'q9': must be one of f32, f16"),
        ("load --flash-attn maybe", r"'maybe' is not on, off or auto"),
        ("bench --kv-type f16,q9", r"q9 is not a KV type"),
    ],
)
def test_bad_kv_magic_options_fail_before_loading(
    shell: InteractiveShell, no_engine: None, line: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        shell.run_line_magic("nbollama", line)
    assert session.current_engine() is None


def test_load_with_kv_type_shows_it_in_the_load_line_and_status(
    shell: InteractiveShell, no_engine: None, capsys: pytest.CaptureFixture[str]
) -> None:
    shell.run_line_magic("nbollama", "load --parallel 2 --ctx 256 --kv-type q8_0 --kv-type-v q4_0")
    engine = session.current_engine()
    assert isinstance(engine, Engine) and engine.kv_type == "K q8_0 / V q4_0"
    assert "(K q8_0 / V q4_0)" in capsys.readouterr().out
    status = shell.run_line_magic("nbollama", "status")
    assert "in K q8_0 / V q4_0" in repr(status) and "K q8_0 / V q4_0" in status._repr_html_()
