"""Reading a Prometheus ``/metrics`` page with ``prometheus_client``'s own parser.

llama-server (``--metrics``) and vLLM publish their state this way. The parser
gives families; here they become a flat view by sample name (``_total``,
``_sum``, ``_count`` and ``_bucket`` kept, as in the text), summed over label
sets (vLLM labels by engine and model) unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["Metrics", "parse_metrics"]


@dataclass(frozen=True)
class Metrics:
    """The samples of one ``/metrics`` page, by sample name."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.samples

    def names(self) -> Iterable[str]:
        return self.samples.keys()

    def has_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.samples)

    def total(self, *names: str) -> float | None:
        """The first of ``names`` that exists, summed over its label sets; None if none does."""
        for name in names:
            found = self.samples.get(name)
            if found:
                return float(sum(s.value for s in found))
        return None

    def mean(self, *names: str) -> float | None:
        """Like ``total`` but averaged over label sets (for ratios such as KV-cache use)."""
        for name in names:
            found = self.samples.get(name)
            if found:
                return float(sum(s.value for s in found) / len(found))
        return None

    def labels(self, name: str) -> dict[str, str] | None:
        """The labels of the first sample called ``name`` (``*_info`` gauges carry their facts there)."""
        found = self.samples.get(name)
        return dict(found[0].labels) if found else None


def parse_metrics(text: str) -> Metrics:
    """Parse the text exposition format; raises ``ValueError`` on a page that is not one."""
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return Metrics(samples)
