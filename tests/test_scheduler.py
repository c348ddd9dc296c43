"""The waiting queue, admission and the step plan: pure logic, no model."""

from __future__ import annotations

import numpy as np
import pytest

from nbollama import QueueFullError
from nbollama._api.queue import WaitingQueue
from nbollama._api.requests import Handle, SamplingParams
from nbollama._core._scheduler import Chunk, Decode, Scheduler, StepPlan, plan_step
from nbollama._core._slots import Request, Slot


def request(n_tokens: int, *, priority: int = 0, request_id: int = 1) -> Request:
    handle = Handle(request_id, "p", n_tokens, 16, lambda h: None)
    return Request(
        handle=handle,
        tokens=np.arange(n_tokens, dtype=np.int32),
        params=SamplingParams(max_tokens=16),
        priority=priority,
        preview="p",
    )


def prefilling(slot_id: int, n_tokens: int, *, done: int = 0, order: int = 0) -> Slot:
    slot = Slot(slot_id)
    slot.take(request(n_tokens), order, keep=0)
    slot.request.n_prefilled = done  # type: ignore[union-attr]
    slot.n_past = done
    return slot


def generating(slot_id: int, n_past: int, token: int = 7) -> Slot:
    slot = prefilling(slot_id, n_past, done=n_past)
    slot.state = "generating"
    slot.last_token = token
    return slot


def test_decodes_come_first_then_prompt_chunks_in_admission_order() -> None:
    slots = [prefilling(0, 300, order=2), generating(1, 40, token=11), prefilling(2, 100, order=1)]
    plan = plan_step(slots, token_budget=256)
    assert plan.decodes == (Decode(slot=1, token=11, pos=40),)
    # slot 2 was admitted first: it gets its whole prompt, slot 0 the rest of the budget
    assert plan.chunks == (Chunk(2, 0, 100, True), Chunk(0, 0, 155, False))
    assert plan.n_tokens == 256 and plan.prefill_tokens == 255
    assert plan.slots == {0, 1, 2}


def test_a_long_prompt_is_prefilled_over_several_steps_from_where_it_left_off() -> None:
    slot = prefilling(0, 1000, done=512)
    plan = plan_step([slot], token_budget=512)
    assert plan.chunks == (Chunk(0, 512, 488, True),)


def test_idle_slots_and_finished_prompts_plan_nothing() -> None:
    assert plan_step([Slot(0), Slot(1)], token_budget=512).empty


def test_decodes_alone_can_fill_the_budget() -> None:
    slots = [generating(i, 10) for i in range(4)] + [prefilling(4, 50)]
    plan = plan_step(slots, token_budget=4)
    assert len(plan.decodes) == 4 and plan.chunks == ()


def test_shrinking_halves_the_prompt_tokens_and_keeps_the_decodes() -> None:
    plan = StepPlan((Decode(0, 1, 5),), (Chunk(1, 0, 100, True), Chunk(2, 0, 60, True)))
    smaller = plan.shrink_prefill()
    assert smaller is not None
    assert smaller.decodes == plan.decodes
    assert smaller.chunks == (Chunk(1, 0, 80, False),)  # 160 -> 80, cut short: no logits yet
    tiny = StepPlan((), (Chunk(1, 0, 1, True),))
    assert tiny.shrink_prefill() is None
    assert StepPlan((Decode(0, 1, 5),)).shrink_prefill() is None


def test_admission_fills_the_lowest_idle_slots_by_priority() -> None:
    scheduler = Scheduler(max_queue=8)
    low, high, mid = (
        request(3, priority=0, request_id=1),
        request(3, priority=5, request_id=2),
        request(3, priority=1, request_id=3),
    )
    scheduler.push_all([low, high, mid])
    slots = [Slot(0), generating(1, 4), Slot(2)]
    admitted = scheduler.admit(slots)
    assert [(s.id, r.handle.id) for s, r in admitted] == [(0, 2), (2, 3)]
    assert slots[0].state == "prefill" and slots[0].request is high
    assert admitted[0][1].admitted_order < admitted[1][1].admitted_order
    assert len(scheduler.queue) == 1


def test_the_victim_is_the_longest_sequence() -> None:
    slots = [generating(0, 10), generating(1, 90), prefilling(2, 500, done=40), Slot(3)]
    assert Scheduler.victim(slots) is slots[1]
    assert Scheduler.victim([Slot(0)]) is None


def test_the_queue_is_all_or_none_and_cancels_in_place() -> None:
    queue: WaitingQueue[str] = WaitingQueue(3)
    queue.push_all([("a", 0), ("b", 0)])
    with pytest.raises(QueueFullError, match="already waiting"):
        queue.push_all([("c", 0), ("d", 0)])
    with pytest.raises(QueueFullError, match="more than the queue holds"):
        queue.push_all([("x", 0)] * 4)
    assert len(queue) == 2 and queue.remove("a") and not queue.remove("a")
    queue.push_all([("e", 9)])
    assert queue.items() == ["e", "b"]
    assert queue.pop() == "e" and queue.pop() == "b" and queue.pop() is None


# -- laying prompt chunks out for a KV stream per slot (``_batch.chunk_layout``) -------------------


def test_ubatch_rows_follows_llama_cpps_equal_split() -> None:
    from nbollama._core._batch import UBATCH_ROWS, ubatch_rows

    assert ubatch_rows([5, 5, 5]) == UBATCH_ROWS + 15  # one run, equal counts: one ubatch
    assert ubatch_rows([5, 9]) == 2 * UBATCH_ROWS + 14  # 2 x 5, then 4 of the second alone
    assert ubatch_rows([5, 0, 5]) == 2 * UBATCH_ROWS + 10  # a gap breaks the run of ids
    assert ubatch_rows([0, 0]) == 0


def test_similar_chunks_go_together_and_scattered_ones_alone() -> None:
    from nbollama._core._batch import UBATCH_ROWS, chunk_layout, ubatch_rows

    ends = {seq: 40 for seq in range(8)}
    lay = lambda spans: chunk_layout(spans, capacity=512, ctx_per_slot=256, end_of=ends.__getitem__)  # noqa: E731
    assert lay({0: (0, 55), 1: (0, 56), 2: (0, 57), 3: (0, 55)}) == [57, 57, 57, 57]
    # two slots far apart with long chunks: padding the six between costs more than a call each
    assert lay({0: (0, 50), 7: (0, 50)}) is None
    # levels: two short and two long chunks cost two ubatches, not four nor one of the longest
    layout = lay({0: (0, 10), 1: (0, 11), 2: (0, 40), 3: (0, 41)})
    assert layout is not None and ubatch_rows(layout) < 4 * UBATCH_ROWS + 102
    assert all(n >= c for n, c in zip(layout, [10, 11, 40, 41]))
    # a throwaway token past a slot's context is never laid out
    assert lay({0: (200, 56), 1: (0, 40)}) in (None, [56, 40])
    assert (
        chunk_layout(
            {0: (0, 300), 1: (0, 300)}, capacity=512, ctx_per_slot=1024, end_of=ends.__getitem__
        )
        is None
    )


def test_many_slots_get_a_layout_from_a_few_levels() -> None:
    from nbollama._core._batch import MAX_LEVELS, chunk_layout

    counts = {seq: 50 + seq % 5 for seq in range(64)}
    layout = chunk_layout(
        {seq: (0, n) for seq, n in counts.items()}, capacity=4096, ctx_per_slot=1024, end_of=lambda seq: 0
    )
    assert layout is not None and all(n >= counts[seq] for seq, n in enumerate(layout))
    assert len(set(layout)) <= MAX_LEVELS
