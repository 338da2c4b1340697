"""Prometheus metrics for GET /metrics.

The engine's state is read at scrape time from the loop thread's latest
stats snapshot, so nothing has to be pushed on every step.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.state import ServerState


class EngineCollector(Collector):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("pagedinfer_ready", "1 once the model is loaded and the server takes requests",
                                value=float(self.state.ready))
        stats = self.state.engine.stats() if self.state.engine is not None else None
        if stats is None:
            return
        gauges = {
            "pagedinfer_num_requests_running": ("Requests in the running batch", stats.num_running),
            "pagedinfer_num_requests_waiting": ("Requests waiting to be scheduled", stats.num_waiting),
            "pagedinfer_kv_cache_usage_ratio": ("Used KV cache blocks / all blocks", stats.kv_cache_usage),
            "pagedinfer_kv_cache_free_blocks": ("Free KV cache blocks", stats.num_free_blocks),
            "pagedinfer_kv_cache_total_blocks": ("All KV cache blocks", stats.num_total_blocks),
        }
        for name, (documentation, value) in gauges.items():
            yield GaugeMetricFamily(name, documentation, value=value)
        counters = {
            "pagedinfer_preemptions": ("Requests preempted to free KV cache", stats.num_preemptions),
            "pagedinfer_prefix_cache_queries": ("Prompt blocks looked up in the prefix cache", stats.prefix_cache_queries),
            "pagedinfer_prefix_cache_hits": ("Prompt blocks found in the prefix cache", stats.prefix_cache_hits),
        }
        for name, (documentation, value) in counters.items():
            yield CounterMetricFamily(name, documentation, value=value)


def create_registry(state: ServerState) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(state))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, with its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
