"""The model runner: the only part of the engine that touches the llama.cpp context, batch and samplers.

``run(plan)`` fills one batch from a ``StepPlan``, decodes it (halving the
prompt chunks while the KV cache has no room) and samples every slot that
has logits. A slot whose sampling fails is reported alone, so the engine can
fail that request and keep the others, as llama.cpp's server releases only
the slot that failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ._llama import (
    DECODE_NO_KV_SLOT,
    DECODE_OK,
    Batch,
    LlamaContext,
    LlamaModel,
    Sampler,
    make_sampler,
)
from ._requests import SamplingParams
from ._scheduler import StepPlan
from ._slots import Request

__all__ = ["ModelRunner", "StepOutcome"]


@dataclass
class StepOutcome:
    """What one step did: the plan that was decoded, and each slot's sampled token or error."""

    status: int  # llama_decode's: 0 ok, 1 no KV room even for the smallest plan, else fatal for the step
    plan: StepPlan
    tokens: dict[int, int] = field(default_factory=dict)  # slot -> sampled token
    failures: dict[int, str] = field(default_factory=dict)  # slot -> why sampling failed


class ModelRunner:
    def __init__(self, model: LlamaModel, context: LlamaContext, n_batch: int) -> None:
        self.model = model
        self.context = context
        self.batch = Batch(n_batch)

    def sampler_for(self, params: SamplingParams, prompt: object) -> Sampler:
        return make_sampler(params, n_vocab=self.model.n_vocab, prompt=prompt)  # type: ignore[arg-type]

    def reset_sequence(self, seq: int) -> None:
        self.context.clear_sequence(seq)

    def run(self, plan: StepPlan, requests: Mapping[int, Request]) -> StepOutcome:
        """Decode ``plan`` (``requests``: slot -> its request), then sample where logits came out."""
        current: StepPlan | None = plan
        status = DECODE_NO_KV_SLOT
        outputs: dict[int, int] = {}
        while current is not None:
            outputs = self._fill(current, requests)
            status = self.context.decode(self.batch)
            if status != DECODE_NO_KV_SLOT:
                break
            smaller = current.shrink_prefill()
            if smaller is None:
                break
            current = smaller
        decoded = current if current is not None else plan
        outcome = StepOutcome(status, decoded)
        if status != DECODE_OK:
            return outcome
        for slot, index in outputs.items():
            sampler = requests[slot].sampler
            try:
                assert sampler is not None, "a slot with logits has no sampler"
                outcome.tokens[slot] = sampler.sample(self.context, index)
            except Exception as exc:  # one slot's sampler: that request fails, the step goes on
                outcome.failures[slot] = f"sampling failed: {type(exc).__name__}: {exc}"
        return outcome

    def _fill(self, plan: StepPlan, requests: Mapping[int, Request]) -> dict[int, int]:
        """Put the plan in the batch; slot -> batch index of its logits."""
        batch = self.batch
        batch.clear()
        outputs: dict[int, int] = {}
        for d in plan.decodes:
            outputs[d.slot] = batch.add(d.token, d.pos, d.slot, True)
        for c in plan.chunks:
            tokens = requests[c.slot].tokens[c.start : c.start + c.count]
            last = batch.add_span(tokens, c.start, c.slot, c.ends_prompt)
            if c.ends_prompt:
                outputs[c.slot] = last
        return outputs

    def close(self) -> None:
        self.context.close()
