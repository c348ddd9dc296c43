"""The engine's public face: ``Engine``, ``Handle``, ``Result`` and friends.

Everything here is implemented in ``nbollama._core``; import from here (or
from ``nbollama``), never from ``_core``.
"""

from __future__ import annotations

from ._core._engine import DEFAULT_MAX_QUEUE, MAX_QUEUE_ENV, NUM_PARALLEL_ENV, Engine, Subscription
from ._core._requests import FinishReason, Handle, RequestStatus, Result, SamplingParams
from ._core._snapshot import SNAPSHOT_VERSION, EngineSnapshot, SlotSnapshot

__all__ = [
    "Engine",
    "Handle",
    "Result",
    "SamplingParams",
    "Subscription",
    "FinishReason",
    "RequestStatus",
    "EngineSnapshot",
    "SlotSnapshot",
    "SNAPSHOT_VERSION",
    "DEFAULT_MAX_QUEUE",
    "MAX_QUEUE_ENV",
    "NUM_PARALLEL_ENV",
]
