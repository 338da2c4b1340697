"""Prometheus metrics for GET /metrics.

`EngineMetrics.record(outputs, stats)` runs on the event loop once per
message from the engine core (AsyncLLM calls it for every step); it turns
the step's RequestOutputs and the engine's EngineStats into counters and
histograms. All latencies come from the engine's own monotonic timestamps
(`RequestOutput.metrics`, taken in the core process on the same clock), so
they measure the engine, not the server that reads them. A scrape runs on
the same event loop, so it never sees half a step.

Every series carries `model_name` (the --served-model-name), which the
autoscaling queries in deploy/k8s filter on. With `--metrics-compat vllm`
the same values are exported a second time under vLLM's names, and
`vllm:cache_config_info` (value 1) tells routers the KV cache's shape in
vLLM's label names and value format: `block_size`, `num_gpu_blocks` (the
engine's KV blocks, on whatever device), `enable_prefix_caching`,
`prefix_caching_hash_algo` and `engine` ("0"); like vLLM's, it carries no
`model_name`. It appears once the model is loaded. With --enable-lora,
`server/lora_metrics.py` adds vLLM's `vllm:lora_requests_info` and
per-adapter request gauges; with --speculative-config,
`server/spec_decode_metrics.py` adds the speculative decoding counters.

What counts as what:
- the histograms observe once per request (the prompt given to the engine;
  a request with n > 1 is one request), except the inter-token latency,
  observed once per generated token that is not the first of its
  completion, with the gap since the request's previous step that produced
  tokens;
- `request_success_total{finished_reason}` counts finished completions (n
  per request), by "stop", "length" or "abort";
- prompt tokens are counted once per request, when its first token comes;
- `startup_seconds{phase}` gives the start-up's phases once the server is
  ready (inference/startup_phases.py), and `phase="total"` the whole;
- `structured_requests_total{kind}` counts finished structured-output
  requests by grammar kind (json, json_object, regex, choice, grammar; tool
  choices "required" and named are json), and the grammar compile-time
  histogram observes each request whose add compiled a new grammar (cache
  hits compile nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector

from server.histogram import Histogram

from server.lora_metrics import LoRAMetrics
from server.spec_decode_metrics import SpecDecodeMetrics

if TYPE_CHECKING:
    from inference.engine import EngineStats
    from inference.outputs import RequestOutput
    from server.state import ServerState

# Bucket bounds in seconds (vLLM's, so dashboards carry over).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")  # always exported, 0 until seen
COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# key: (pagedinfer name, vLLM name or None, help). Counter names lack the
# `_total` suffix: prometheus_client appends it.
GAUGES = {
    "running": ("pagedinfer_num_requests_running", "vllm:num_requests_running",
                "Requests in the running batch"),
    "waiting": ("pagedinfer_num_requests_waiting", "vllm:num_requests_waiting",
                "Requests in the engine's queue, not yet scheduled"),
    "kv_usage": ("pagedinfer_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc",
                 "Fraction of KV-cache blocks in use, 0 to 1"),
    "kv_waste": ("pagedinfer_kv_cache_waste_ratio", None,
                 "Fraction of allocated KV-cache slots that hold no token"),
    "free_blocks": ("pagedinfer_kv_cache_free_blocks", None, "Free KV-cache blocks"),
    "total_blocks": ("pagedinfer_kv_cache_total_blocks", None, "All KV-cache blocks"),
}
COUNTERS = {
    "prompt_tokens": ("pagedinfer_prompt_tokens", "vllm:prompt_tokens",
                      "Prompt tokens of the requests that produced a token"),
    "generation_tokens": ("pagedinfer_generation_tokens", "vllm:generation_tokens", "Generated tokens"),
    "preemptions": ("pagedinfer_num_preemptions", "vllm:num_preemptions",
                    "Sequences preempted to free KV cache (their work is recomputed)"),
    "prefix_queries": ("pagedinfer_prefix_cache_queries", "vllm:prefix_cache_queries",
                       "Prompt blocks looked up in the prefix cache"),
    "prefix_hits": ("pagedinfer_prefix_cache_hits", "vllm:prefix_cache_hits",
                    "Prompt blocks found in the prefix cache"),
    "kv_events_dropped": ("pagedinfer_kv_events_dropped", None,
                          "KV-cache events dropped because the publisher's queue was full"),
}
STARTUP = ("pagedinfer_startup_seconds",
           "Seconds of each start-up phase (phase=\"total\": from the process's start to ready; "
           "the front end's tokenizer loads while the core starts, so phases overlap)")
CACHE_CONFIG_INFO = ("vllm:cache_config_info", "Information of the LLMEngine CacheConfig")
SUCCESS = ("pagedinfer_request_success", "vllm:request_success", "Finished completions by finish reason")
STRUCTURED = ("pagedinfer_structured_requests", None, "Finished structured-output requests by grammar kind")
HISTOGRAMS = {
    "ttft": ("pagedinfer_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
             "Arrival to first generated token", TTFT_BUCKETS),
    "itl": ("pagedinfer_inter_token_latency_seconds", "vllm:inter_token_latency_seconds",
            "Time between consecutive tokens of a completion", ITL_BUCKETS),
    "e2e": ("pagedinfer_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds",
            "Arrival to finish of a request", REQUEST_BUCKETS),
    "queue": ("pagedinfer_request_queue_time_seconds", "vllm:request_queue_time_seconds",
              "Arrival to first being scheduled", REQUEST_BUCKETS),
    "compile": ("pagedinfer_grammar_compile_seconds", None,
                "Compile time of a new structured-output grammar", COMPILE_BUCKETS),
}


class EngineMetrics(Collector):
    """Engine metrics of one server, in their own CollectorRegistry."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.model_name = state.settings.served_model_name
        self.vllm_names = state.settings.metrics_compat == "vllm"
        self._gauges = dict.fromkeys(GAUGES, 0.0)
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._success = dict.fromkeys(FINISH_REASONS, 0)
        self._structured: dict[str, int] = {}
        self._histograms = {key: Histogram(spec[3]) for key, spec in HISTOGRAMS.items()}
        # request id -> time of its last step with new tokens
        self._last_token_time: dict[str, float] = {}
        self.trace_ids: dict[str, str] = {}  # engine request id -> trace id, while traced requests run
        self._lora = LoRAMetrics(self.model_name)
        self._spec_decode = SpecDecodeMetrics(self.model_name)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # ---- per core message ----------------------------------------------------

    def record(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """Account one engine step."""
        hist = self._histograms
        counters = self._counters
        trace_ids = self.trace_ids
        for output in outputs:
            times = output.metrics
            num_new = sum(output.new_token_counts)
            trace_id = trace_ids.get(output.request_id) if trace_ids else None
            if num_new and times is not None:
                now = times.last_token_time
                previous = self._last_token_time.get(output.request_id)
                if previous is None:  # the request's first tokens
                    hist["ttft"].observe(times.first_token_time - times.arrival_time, trace_id=trace_id)
                    counters["prompt_tokens"] += len(output.prompt_token_ids)
                    previous = times.first_token_time
                # a completion's first token has no gap before it
                num_firsts = sum(1 for c, k in zip(output.outputs, output.new_token_counts)
                                 if k and len(c.token_ids) == k)
                if num_new > num_firsts:
                    hist["itl"].observe(now - previous, num_new - num_firsts, trace_id=trace_id)
                counters["generation_tokens"] += num_new
                self._last_token_time[output.request_id] = now
            if output.finished:
                self._last_token_time.pop(output.request_id, None)
                if times is not None:
                    if times.finished_time is not None:
                        hist["e2e"].observe(times.finished_time - times.arrival_time, trace_id=trace_id)
                    if times.first_scheduled_time is not None:
                        hist["queue"].observe(times.first_scheduled_time - times.arrival_time)
                    if times.structured_kind is not None:
                        self._structured[times.structured_kind] = self._structured.get(times.structured_kind, 0) + 1
                    if times.grammar_compile_time is not None:
                        hist["compile"].observe(times.grammar_compile_time)
                for completion in output.outputs:
                    reason = completion.finish_reason or "abort"
                    self._success[reason] = self._success.get(reason, 0) + 1
        counters["preemptions"] = stats.num_preemptions
        counters["prefix_queries"] = stats.prefix_cache_queries
        counters["prefix_hits"] = stats.prefix_cache_hits
        counters["kv_events_dropped"] = stats.num_kv_events_dropped
        self._gauges.update(
            running=stats.num_running,
            waiting=stats.num_waiting,
            kv_usage=stats.kv_cache_usage,
            kv_waste=stats.kv_waste_ratio,
            free_blocks=stats.num_free_blocks,
            total_blocks=stats.num_total_blocks,
        )
        self._spec_decode.record(stats)
        engine = self.state.engine
        if engine is not None and engine.config is not None and engine.config.lora is not None:
            self._lora.record(stats, engine.config.lora.max_loras)

    def totals(self) -> dict[str, float]:
        """Gauges and running totals now, for the console's stats history."""
        ttft, itl = self._histograms["ttft"], self._histograms["itl"]
        return {
            "generation_tokens": self._counters["generation_tokens"],
            "running": self._gauges["running"],
            "waiting": self._gauges["waiting"],
            "kv_usage": self._gauges["kv_usage"],
            "ttft_sum": ttft.sum, "ttft_count": ttft.count,
            "itl_sum": itl.sum, "itl_count": itl.count,
        }

    # ---- scrape (event loop) -----------------------------------------------

    def _names(self, spec: tuple) -> list[str]:
        ours, vllm = spec[0], spec[1]
        return [ours, vllm] if self.vllm_names and vllm else [ours]

    def collect(self) -> Iterator[Metric]:
        label = [self.model_name]
        gauges = dict(self._gauges)
        counters = dict(self._counters)
        success = dict(self._success)
        structured = dict(self._structured)
        histograms = {key: (h.cumulative(), h.sum) for key, h in self._histograms.items()}

        ready = GaugeMetricFamily("pagedinfer_ready", "1 once the model is loaded and the server takes requests",
                                  labels=["model_name"])
        ready.add_metric(label, float(self.state.ready))
        yield ready
        for key, spec in GAUGES.items():
            for name in self._names(spec):
                family = GaugeMetricFamily(name, spec[2], labels=["model_name"])
                family.add_metric(label, float(gauges[key]))
                yield family
        for key, spec in COUNTERS.items():
            for name in self._names(spec):
                family = CounterMetricFamily(name, spec[2], labels=["model_name"])
                family.add_metric(label, float(counters[key]))
                yield family
        for name in self._names(SUCCESS):
            family = CounterMetricFamily(name, SUCCESS[2], labels=["model_name", "finished_reason"])
            for reason, count in success.items():
                family.add_metric([self.model_name, reason], float(count))
            yield family
        family = CounterMetricFamily(STRUCTURED[0], STRUCTURED[2], labels=["model_name", "kind"])
        for kind, count in structured.items():
            family.add_metric([self.model_name, kind], float(count))
        yield family
        if self.vllm_names:
            yield from self._cache_config_info()
        yield from self._startup()
        yield from self._lora.collect()
        yield from self._spec_decode.collect(self.vllm_names)
        for key, spec in HISTOGRAMS.items():
            buckets, total = histograms[key]
            for name in self._names(spec):
                family = HistogramMetricFamily(name, spec[2], labels=["model_name"])
                family.add_metric(label, buckets, total)
                yield family

    def _startup(self) -> Iterator[Metric]:
        startup = self.state.startup  # None until ready
        if startup is None:
            return
        family = GaugeMetricFamily(STARTUP[0], STARTUP[1], labels=["model_name", "phase"])
        for phase, seconds in [*startup.seconds.items(), ("total", self.state.startup_total_s)]:
            family.add_metric([self.model_name, phase], seconds)
        yield family

    def _cache_config_info(self) -> Iterator[Metric]:
        engine = self.state.engine
        config = engine.config if engine is not None else None  # None until the model is loaded
        stats = engine.stats() if engine is not None else None
        if config is None or stats is None:
            return
        # vLLM's values are str() of its config fields: "16", "True".
        labels = {
            "block_size": str(config.block_size),
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "engine": "0",
            "num_gpu_blocks": str(stats.num_total_blocks),
            "prefix_caching_hash_algo": config.prefix_caching_hash_algo,
        }
        family = GaugeMetricFamily(CACHE_CONFIG_INFO[0], CACHE_CONFIG_INFO[1], labels=list(labels))
        family.add_metric(list(labels.values()), 1.0)
        yield family


def render(registry: CollectorRegistry, openmetrics: bool = False) -> tuple[bytes, str]:
    """The registry in Prometheus text format, or OpenMetrics (the one with
    exemplars), with its content type."""
    if openmetrics:
        return openmetrics_exposition.generate_latest(registry), openmetrics_exposition.CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST
