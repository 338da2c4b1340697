"""A Prometheus histogram kept by hand, with trace exemplars.

`observe(value, count)` adds `count` equal observations in O(log buckets),
so a step costs one call per request. An observation made with a trace id
becomes its bucket's exemplar (the last one wins), which OpenMetrics shows
beside the bucket so a slow bucket leads to a trace.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString


class Histogram:
    __slots__ = ("bounds", "counts", "sum", "exemplars")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.exemplars: list[Exemplar | None] = [None] * len(self.counts)

    def observe(self, value: float, count: int = 1, trace_id: str | None = None) -> None:
        value = max(value, 0.0)
        bucket = bisect_left(self.bounds, value)  # le is inclusive
        self.counts[bucket] += count
        self.sum += value * count
        if trace_id is not None:
            self.exemplars[bucket] = Exemplar({"trace_id": trace_id}, value, time.time())

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float] | tuple[str, float, Exemplar]]:
        """(le, cumulative count), with the bucket's exemplar when it has one."""
        buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
        total = 0
        for bound, count, exemplar in zip((*self.bounds, float("inf")), self.counts, self.exemplars):
            total += count
            le = floatToGoString(bound)
            buckets.append((le, total) if exemplar is None else (le, total, exemplar))
        return buckets
