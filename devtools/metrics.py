"""Reading one sample out of a Prometheus text page (the gateway's ``/metrics``)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the first sample called ``name`` whose labels include ``labels``;
    0 when there is none (a counter not yet incremented is absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0
