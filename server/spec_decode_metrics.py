"""Speculative decoding counters, exported whenever the server runs with
--speculative-config (nothing without it).

The engine's totals since start (`EngineStats.spec_decode`), as counters
with vLLM's meaning: `num_drafts` (one per request per step that verified
guesses), `num_draft_tokens`, `num_accepted_tokens`, and
`num_accepted_tokens_per_pos{position}` (drafts whose guess at that 0-based
position was accepted). Ours are named `pagedinfer_spec_decode_*`; with
`--metrics-compat vllm` they are exported a second time under vLLM's names
`vllm:spec_decode_*`, like the rest of server/metrics.py. Every series
carries `model_name`; per_pos has a series for each position up to
num_speculative_tokens once one was drafted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, Metric

if TYPE_CHECKING:
    from inference.engine import EngineStats
    from inference.spec_decode.stats import SpecDecodeStats

# stats field: (pagedinfer name, vLLM name, help); prometheus_client appends `_total`.
COUNTERS = {
    "num_drafts": ("pagedinfer_spec_decode_num_drafts", "vllm:spec_decode_num_drafts",
                   "Number of spec decoding drafts."),
    "num_draft_tokens": ("pagedinfer_spec_decode_num_draft_tokens", "vllm:spec_decode_num_draft_tokens",
                         "Number of draft tokens."),
    "num_accepted_tokens": ("pagedinfer_spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens",
                            "Number of accepted tokens."),
}
PER_POS = ("pagedinfer_spec_decode_num_accepted_tokens_per_pos", "vllm:spec_decode_num_accepted_tokens_per_pos",
           "Accepted tokens per draft position.")


class SpecDecodeMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._stats: SpecDecodeStats | None = None  # None while speculation is off

    def record(self, stats: EngineStats) -> None:
        self._stats = stats.spec_decode

    def collect(self, vllm_names: bool) -> Iterator[Metric]:
        stats = self._stats
        if stats is None:
            return
        for field, spec in COUNTERS.items():
            for name in spec[:2] if vllm_names else spec[:1]:
                family = CounterMetricFamily(name, spec[2], labels=["model_name"])
                family.add_metric([self.model_name], float(getattr(stats, field)))
                yield family
        for name in PER_POS[:2] if vllm_names else PER_POS[:1]:
            family = CounterMetricFamily(name, PER_POS[2], labels=["model_name", "position"])
            for position, count in enumerate(stats.num_accepted_tokens_per_pos):
                family.add_metric([self.model_name, str(position)], float(count))
            yield family
