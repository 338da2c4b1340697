"""The PromQL that the autoscalers in deploy/k8s run, read from the manifests.

A test that runs these queries against a real Prometheus scraping the server
imports this module, so the queries it checks are the ones that ship, not a
copy of them:

    from k8s_queries import scaling_queries
    scaling_queries()
    # {'waiting': 'sum(pagedinfer_num_requests_waiting{namespace="pagedinfer",
    #              model_name="SmolLM2-135M-Instruct"}) or vector(0)',
    #  'kv_usage': 'avg(pagedinfer_kv_cache_usage_ratio{...}) or vector(0)'}

In a cluster, Prometheus adds the `namespace` (and `pod`) target labels
itself. A local Prometheus with a static scrape config has none of them: add
`labels: {namespace: pagedinfer}` to its static_configs, or call
`scaling_queries(drop_labels=["namespace"])`.

Only PyYAML is needed: no kustomize, no cluster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
SCALED_OBJECT = K8S / "components" / "keda" / "scaledobject.yaml"
HPA = K8S / "overlays" / "hpa" / "horizontalpodautoscaler.yaml"
ADAPTER_RULES = K8S / "overlays" / "hpa" / "prometheus-adapter-rules.yaml"

# Names in the returned dicts; the KEDA triggers carry the same names.
QUERY_NAMES = ("waiting", "kv_usage")

# HPA metric name -> our name for the signal.
_HPA_METRICS = {
    "pagedinfer_num_requests_waiting": "waiting",
    "pagedinfer_kv_cache_usage_ratio_avg": "kv_usage",
}

_MATCHER = re.compile(r'\s*,?\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def drop_label_matchers(query: str, labels: Iterable[str]) -> str:
    """Remove the `label<op>"value"` matchers for the given labels from a query."""
    drop = set(labels)
    if not drop:
        return query

    def clean(selector: re.Match) -> str:
        kept = [
            f'{name}{op}"{value}"'
            for name, op, value in _MATCHER.findall(selector.group(1))
            if name not in drop
        ]
        return "{" + ",".join(kept) + "}" if kept else ""

    return re.sub(r"\{([^{}]*)\}", clean, query)


def scaled_object_triggers() -> list[dict]:
    """The `spec.triggers` list of the KEDA ScaledObject, as written."""
    return _load(SCALED_OBJECT)["spec"]["triggers"]


def scaling_queries(*, drop_labels: Iterable[str] = ()) -> dict[str, str]:
    """Map "waiting" and "kv_usage" to the exact query of that KEDA trigger.

    The queries name their model and namespace literally (no templating), so
    they are returned as written, less any `drop_labels` matchers.
    """
    drop_labels = list(drop_labels)
    queries = {}
    for trigger in scaled_object_triggers():
        name = trigger.get("name")
        if name in QUERY_NAMES:
            queries[name] = drop_label_matchers(trigger["metadata"]["query"].strip(), drop_labels)
    missing = set(QUERY_NAMES) - set(queries)
    if missing:
        raise KeyError(f"{SCALED_OBJECT} has no trigger named {sorted(missing)}")
    return queries


def adapter_config() -> dict:
    """The prometheus-adapter config (`rules:`, `externalRules:`) from the ConfigMap."""
    return yaml.safe_load(_load(ADAPTER_RULES)["data"]["config.yaml"])


def _series_name(rule: dict) -> str:
    return re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)


def _rule_metric_name(rule: dict) -> str:
    """The metric name a rule exposes: `name.matches` applied, `name.as` ($0, $1...) filled."""
    series = _series_name(rule)
    name = rule.get("name") or {}
    match = re.match(name.get("matches", ".*"), series)
    if match is None:
        return series
    template = name.get("as") or ("$1" if match.groups() else "$0")
    return re.sub(r"\$(\d+)", lambda ref: match.group(int(ref.group(1))), template)


def _render(template: str, series: str, matchers: dict[str, str], group_by: str) -> str:
    label_matchers = ",".join(f'{k}="{v}"' for k, v in matchers.items())
    return (
        template.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", label_matchers)
        .replace("<<.GroupBy>>", group_by)
    )


def adapter_queries(*, drop_labels: Iterable[str] = ()) -> dict[str, str]:
    """Map "waiting" and "kv_usage" to the query prometheus-adapter sends for the HPA.

    The adapter fills its `metricsQuery` template per request: `<<.Series>>`
    is the series name, `<<.LabelMatchers>>` the HPA's namespace plus the
    metric's selector labels, `<<.GroupBy>>` the pod label for per-pod rules.
    For per-pod rules the adapter also adds a `pod=~"<pods of the target>"`
    matcher; it is left out here, so the query covers every pod.
    """
    hpa = _load(HPA)
    namespace = hpa["metadata"]["namespace"]
    selectors = {}
    for metric in hpa["spec"]["metrics"]:
        spec = metric[metric["type"].lower()]["metric"]
        selectors[spec["name"]] = spec.get("selector", {}).get("matchLabels", {})

    config = adapter_config()
    drop = set(drop_labels)
    queries = {}
    for kind, group_by in (("rules", "pod"), ("externalRules", "")):
        for rule in config.get(kind, []):
            exposed = _rule_metric_name(rule)
            ours = _HPA_METRICS.get(exposed)
            if ours is None or exposed not in selectors:
                continue
            series = _series_name(rule)
            matchers = {"namespace": namespace, **selectors[exposed]}
            matchers = {k: v for k, v in matchers.items() if k not in drop}
            queries[ours] = _render(rule["metricsQuery"], series, matchers, group_by)
    missing = set(QUERY_NAMES) - set(queries)
    if missing:
        raise KeyError(f"{ADAPTER_RULES} and {HPA} give no query for {sorted(missing)}")
    return queries
