"""The console's metrics history: one point per second over the last 5 minutes.

A point is taken from the server's own metrics (`EngineMetrics.totals()`),
so the console needs no Prometheus: rates and means are the differences of
running totals between two points. It runs on the event loop, like the
metrics it reads, so a point never sees half a step.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from server.metrics import EngineMetrics

INTERVAL_S = 1.0
WINDOW_S = 300.0


@dataclass(slots=True)
class StatsPoint:
    time: float  # Unix seconds
    output_tokens_per_s: float
    running: int
    waiting: int
    kv_usage: float  # 0 to 1
    ttft_s: float | None  # mean over the interval; None without a first token in it
    itl_s: float | None


def _mean(total: float, count: float) -> float | None:
    return total / count if count else None


class StatsHistory:
    def __init__(self, metrics: EngineMetrics, window_s: float = WINDOW_S, interval_s: float = INTERVAL_S) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.points: deque[StatsPoint] = deque(maxlen=int(window_s / interval_s))
        self._last = metrics.totals()
        self._last_time = time.monotonic()

    def sample(self) -> None:
        now, totals = time.monotonic(), self.metrics.totals()
        last, elapsed = self._last, max(now - self._last_time, 1e-9)
        self.points.append(StatsPoint(
            time=time.time(),
            output_tokens_per_s=(totals["generation_tokens"] - last["generation_tokens"]) / elapsed,
            running=int(totals["running"]),
            waiting=int(totals["waiting"]),
            kv_usage=totals["kv_usage"],
            ttft_s=_mean(totals["ttft_sum"] - last["ttft_sum"], totals["ttft_count"] - last["ttft_count"]),
            itl_s=_mean(totals["itl_sum"] - last["itl_sum"], totals["itl_count"] - last["itl_count"]),
        ))
        self._last, self._last_time = totals, now

    async def run(self) -> None:
        """Sample every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.sample()

    def as_json(self) -> dict[str, Any]:
        return {"interval_s": self.interval_s, "points": [asdict(point) for point in self.points]}
