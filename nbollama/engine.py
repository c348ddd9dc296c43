"""The engine's public face: ``Engine``, ``Handle``, ``Result`` and friends.

Everything here is implemented in ``nbollama._core``; import from here (or
from ``nbollama``), never from ``_core``.
"""

from __future__ import annotations

from ._api.monitor import Subscription
from ._api.protocol import EngineLike
from ._api.requests import (
    FinishReason,
    Handle,
    RequestStatus,
    Result,
    SamplingParams,
    check_request_params,
)
from ._api.snapshot import SNAPSHOT_VERSION, EngineSnapshot, SlotSnapshot
from ._core._config import DEFAULT_MAX_QUEUE, MAX_QUEUE_ENV, NUM_PARALLEL_ENV, LoadOptions
from ._core._engine import Engine

__all__ = [
    "Engine",
    "EngineLike",
    "Handle",
    "Result",
    "SamplingParams",
    "Subscription",
    "LoadOptions",
    "check_request_params",
    "FinishReason",
    "RequestStatus",
    "EngineSnapshot",
    "SlotSnapshot",
    "SNAPSHOT_VERSION",
    "DEFAULT_MAX_QUEUE",
    "MAX_QUEUE_ENV",
    "NUM_PARALLEL_ENV",
]
