"""deploy/k8s/overlays/inference-gateway: the contracts between the server
pods, the InferencePool, the endpoint picker (llm-d's router) and its
config, the HTTPRoute and the Gateway.

The overlay is rendered and validated strictly with every other target in
tests/test_deploy.py (InferencePool, HTTPRoute and Gateway against the
schemas vendored in deploy/k8s/schemas); here the pieces are checked to agree
with each other, so a renamed port, a changed seed or block size, or a pool
that selects nothing fails here rather than as a router that never hits the
prefix cache.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from test_deploy import (
    GATEWAY_NAMESPACE,
    of_kind,
    render,
    selector_matches,
    server_container,
    server_deployment,
    server_service,
    the,
    validation_errors,
)

TARGET = "overlays/inference-gateway"
DEFAULT_KV_EVENTS_PORT = 5557  # vLLM's default `endpoint`, tcp://*:5557


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render(TARGET)


def picker_deployment(docs: list[dict]) -> dict:
    [picker] = [d for d in of_kind(docs, "Deployment") if d is not server_deployment(docs)]
    return picker


def flag(args: list[str], name: str) -> str:
    """The value of `--name=value` in a container's args."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} given {len(values)} times in {args}"
    return values[0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def picker_config(docs: list[dict]) -> dict:
    picker = picker_deployment(docs)
    [container] = picker["spec"]["template"]["spec"]["containers"]
    path = flag(container["args"], "config-file")
    [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in picker["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    [config_map] = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    return yaml.safe_load(config_map["data"][path[len(mount["mountPath"]) + 1:]])


def plugin(config: dict, plugin_type: str) -> dict:
    [found] = [p for p in config["plugins"] if p["type"] == plugin_type]
    return found


def test_the_pool_selects_the_server_pods_on_their_http_port(docs):
    pool = the(docs, "InferencePool")
    server = server_deployment(docs)
    assert selector_matches(pool["spec"]["selector"]["matchLabels"], server["spec"]["template"]["metadata"]["labels"])
    [http] = [p for p in server_container(server)["ports"] if p["name"] == "http"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [http["containerPort"]]
    assert not selector_matches(pool["spec"]["selector"]["matchLabels"],
                                picker_deployment(docs)["spec"]["template"]["metadata"]["labels"])


def test_the_pool_names_the_endpoint_picker_service_and_its_grpc_port(docs):
    ref = the(docs, "InferencePool")["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") == "Service"
    [service] = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == ref["name"]]
    picker = picker_deployment(docs)
    assert selector_matches(service["spec"]["selector"], picker["spec"]["template"]["metadata"]["labels"])
    [port] = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    [container] = picker["spec"]["template"]["spec"]["containers"]
    [target] = [p for p in container["ports"] if port["targetPort"] in (p["name"], p["containerPort"])]
    assert target["containerPort"] == int(flag(container["args"], "grpc-port"))
    assert flag(container["args"], "pool-name") == the(docs, "InferencePool")["metadata"]["name"]
    assert flag(container["args"], "pool-group") == "inference.networking.k8s.io"


def test_the_route_leads_from_the_gateway_to_the_pool(docs):
    route, gateway, pool = the(docs, "HTTPRoute"), the(docs, "Gateway"), the(docs, "InferencePool")
    [parent] = route["spec"]["parentRefs"]
    assert (parent["name"], parent["namespace"]) == (gateway["metadata"]["name"], gateway["metadata"]["namespace"])
    assert gateway["metadata"]["namespace"] == GATEWAY_NAMESPACE
    [listener] = gateway["spec"]["listeners"]
    allowed = listener["allowedRoutes"]["namespaces"]
    assert allowed["from"] == "Selector"
    assert allowed["selector"]["matchLabels"] == {"kubernetes.io/metadata.name": route["metadata"]["namespace"]}
    [rule] = route["spec"]["rules"]
    [backend] = rule["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])


def test_the_picker_may_read_its_pool_and_pods_and_nothing_cluster_wide(docs):
    picker = picker_deployment(docs)
    pod = picker["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    [binding] = of_kind(docs, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "pagedinfer"}]
    [role] = [r for r in of_kind(docs, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"]]
    granted = {(group, resource): set(rule["verbs"])
               for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    for needed in (("", "pods"), ("inference.networking.k8s.io", "inferencepools")):
        assert granted[needed] == {"get", "list", "watch"}, needed
    assert all(verbs <= {"get", "list", "watch"} for verbs in granted.values())
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    # No automounted token (checked for every pod in test_deploy); the picker gets an explicit one.
    [token_volume] = [v for v in pod["volumes"] if "projected" in v]
    assert any("serviceAccountToken" in s for s in token_volume["projected"]["sources"])
    [container] = pod["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == token_volume["name"]]
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"


def test_the_picker_scores_on_queue_kv_usage_and_prefix(docs):
    config = picker_config(docs)
    assert config["apiVersion"] == "llm-d.ai/v1alpha1" and config["kind"] == "EndpointPickerConfig"
    [profile] = config["schedulingProfiles"]
    weights = {p["pluginRef"]: p.get("weight") for p in profile["plugins"]}
    for scorer in ("queue-scorer", "kv-cache-utilization-scorer", "precise-prefix-cache-scorer"):
        plugin(config, scorer)
        assert weights[scorer] > 0, scorer
    assert "max-score-picker" in weights
    defined = {p.get("name", p["type"]) for p in config["plugins"]}
    referenced = set(weights) | {e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s["extractors"]}
    referenced |= {s["pluginRef"] for s in config["dataLayer"]["sources"]}
    assert referenced <= defined, referenced - defined


def test_pods_and_picker_agree_on_events_hashes_and_tokens(docs):
    """Each pod's KV-cache events reach the picker under a topic naming that
    pod, and the picker computes the same block keys from the same tokens."""
    config = picker_config(docs)
    server = server_deployment(docs)
    container = server_container(server)
    args, env = container["args"], env_of(container)
    served = flag(args, "served-model-name")
    [http] = [p for p in container["ports"] if p["name"] == "http"]

    # vLLM's metric names, the label that selects them, the port the picker may use.
    assert flag(args, "metrics-compat") == "vllm"
    pod_meta = server["spec"]["template"]["metadata"]
    assert pod_meta["labels"]["llm-d.ai/engine-type"] == "vllm"
    assert pod_meta["annotations"]["llm-d.ai/active-ports"] == str(http["containerPort"])

    # Events: vLLM's JSON, on vLLM's default port, subscribed per pod by the picker.
    events = json.loads(flag(args, "kv-events-config"))
    assert events["enable_kv_cache_events"] is True and events["publisher"] == "zmq"
    assert events["endpoint"] == f"tcp://*:{DEFAULT_KV_EVENTS_PORT}"
    [events_port] = [p for p in container["ports"] if p["name"] == "kv-events"]
    assert events_port["containerPort"] == DEFAULT_KV_EVENTS_PORT
    scorer = plugin(config, "precise-prefix-cache-scorer")["parameters"]
    discovery = scorer["kvEventsConfig"]
    assert discovery["discoverPods"] is True
    assert discovery["podDiscoveryConfig"]["socketPort"] == DEFAULT_KV_EVENTS_PORT
    # kv@<pod>@<model>, the pod as the picker names it (address:port).
    assert events["topic"] == f"kv@$(POD_IP):{http['containerPort']}@{served}"
    assert events["topic"].startswith(discovery["topicFilter"])
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"

    # Block keys: vLLM's sha256_cbor chain, same seed, same block size.
    assert flag(args, "prefix-caching-hash-algo") == "sha256_cbor"
    tokens = scorer["tokenProcessorConfig"]
    assert env["PYTHONHASHSEED"]["value"] == tokens["hashSeed"]
    assert int(flag(args, "block-size")) == tokens["blockSize"]

    # Tokens: the servers' own render endpoints, through their Service.
    producer = plugin(config, "token-producer")["parameters"]
    assert producer["modelName"] == served
    service = server_service(docs)
    [service_port] = [p for p in service["spec"]["ports"] if p["targetPort"] in ("http", http["containerPort"])]
    namespace = service["metadata"]["namespace"]
    assert producer["vllm"]["http"] == f"http://{service['metadata']['name']}.{namespace}.svc:{service_port['port']}"


def test_the_network_policy_lets_the_picker_reach_metrics_render_and_events(docs):
    policy = the(docs, "NetworkPolicy")
    picker_labels = picker_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    rules = [r for r in policy["spec"]["ingress"]
             if any(selector_matches(p.get("podSelector", {}).get("matchLabels", {}), picker_labels)
                    for p in r["from"])]
    assert len(rules) == 1
    assert {p["port"] for p in rules[0]["ports"]} == {"http", "kv-events"}


def test_inference_extension_validators_reject_unknown_fields(docs):
    for kind, mutate in (
        ("InferencePool", lambda d: d["spec"].update(targetPortNumber=8000)),
        ("InferencePool", lambda d: d["spec"]["endpointPickerRef"].update(portNumber=9002)),
        ("HTTPRoute", lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(namespaces="x")),
        ("Gateway", lambda d: d["spec"]["listeners"][0].update(hostnames=["a"])),
    ):
        doc = the(docs, kind)
        assert not validation_errors(doc), kind
        bad = copy.deepcopy(doc)
        mutate(bad)
        assert validation_errors(bad), f"an unknown {kind} field passed"
