"""LoRA metrics, exported whenever the server runs with --enable-lora.

- `vllm:lora_requests_info`, exactly as vLLM exports it (routers such as
  the Gateway API inference extension read it for adapter affinity): a gauge
  with labels `max_lora`, `waiting_lora_adapters` and
  `running_lora_adapters` (adapter names joined by commas, in first-seen
  order), set to the wall-clock time of each engine update. As in vLLM,
  every label set seen stays, with the time it was last current; the
  current one is the one with the greatest value. It carries no model_name.
- `pagedinfer_lora_num_requests_running` / `_waiting{model_name, lora_name}`:
  per adapter, the requests (samples) running or waiting at the last update.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from inference.engine import EngineStats

LORA_INFO = ("vllm:lora_requests_info", "Running stats on lora requests.")
LABELS = ["max_lora", "waiting_lora_adapters", "running_lora_adapters"]
PER_ADAPTER = {
    "running": ("pagedinfer_lora_num_requests_running", "Requests running, by LoRA adapter"),
    "waiting": ("pagedinfer_lora_num_requests_waiting", "Requests waiting, by LoRA adapter"),
}


class LoRAMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.max_lora: int | None = None  # set once the engine config is known
        self._info: dict[tuple[str, str, str], float] = {}  # labels -> time last current
        self._counts: dict[str, dict[str, int]] = {"running": {}, "waiting": {}}

    def record(self, stats: EngineStats, max_lora: int) -> None:
        self.max_lora = max_lora
        running, waiting = stats.running_lora_adapters, stats.waiting_lora_adapters
        self._info[(str(max_lora), ",".join(waiting), ",".join(running))] = time.time()
        self._counts = {"running": dict(running), "waiting": dict(waiting)}

    def collect(self) -> Iterator[Metric]:
        if self.max_lora is None:
            return
        info = GaugeMetricFamily(LORA_INFO[0], LORA_INFO[1], labels=LABELS)
        for labels, when in self._info.items():
            info.add_metric(list(labels), when)
        yield info
        for key, (name, documentation) in PER_ADAPTER.items():
            family = GaugeMetricFamily(name, documentation, labels=["model_name", "lora_name"])
            for lora_name, count in self._counts[key].items():
                family.add_metric([self.model_name, lora_name], float(count))
            yield family
