"""Throughput and latency figures, named as in the design: ttft, tpot, queue_wait, throughput.

The engine feeds a ``ThroughputMeter`` once per step; benchmarks, the sweep
and the notebooks summarise lists of ``Result`` with ``summarize``.
"""

from __future__ import annotations

from ._api.metrics import RunSummary, ThroughputMeter, percentile, summarize

__all__ = ["ThroughputMeter", "RunSummary", "summarize", "percentile"]
