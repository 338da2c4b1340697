"""deploy/k8s/components/tracing (rendered by overlays/tracing): the server's
OTEL_* variables, the OpenTelemetry Collector and the Jaeger all-in-one agree.

The overlay is rendered and validated strictly with every other target in
tests/test_deploy.py; here the server's variables are held to what `serve`
accepts, each hop (server -> collector -> Jaeger) to a Service port that
reaches a container port, and the collector's configuration is validated by
a real collector: the pinned Jaeger v1.75.0 is an OpenTelemetry Collector
build with the same receiver, processors and exporter.
"""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

import pytest
import yaml

from go_tools import go_tool
from test_deploy import of_kind, render, server_container, server_deployment, the

TARGET = "overlays/tracing"
JAEGER_IMAGE = "jaegertracing/jaeger:2.12.0"  # the v2 release of v1.75.0, the version tests/tools/jaeger pins


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render(TARGET)


def server_env(docs: list[dict]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in server_container(server_deployment(docs))["env"] if "value" in e}


def container_port(docs: list[dict], service_name: str, port: int) -> tuple[dict, int]:
    """(the Deployment behind a Service, the container port its `port` reaches)."""
    [service] = [s for s in of_kind(docs, "Service") if s["metadata"]["name"] == service_name]
    [entry] = [p for p in service["spec"]["ports"] if p["port"] == port]
    [deployment] = [d for d in of_kind(docs, "Deployment")
                    if d["spec"]["template"]["metadata"]["labels"].items() >= service["spec"]["selector"].items()]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    [target] = [p for p in container["ports"] if entry["targetPort"] in (p["name"], p["containerPort"])]
    return deployment, target["containerPort"]


def collector_config(docs: list[dict]) -> str:
    [config_map] = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == "otel-collector"]
    return config_map["data"]["config.yaml"]


def test_server_variables_turn_tracing_on_and_pass_its_checks(docs, monkeypatch):
    from server.tracing_config import check_tracing, tracing_endpoint

    env = server_env(docs)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    endpoint = tracing_endpoint(None)
    assert endpoint == env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    assert check_tracing(endpoint) is None
    assert env["OTEL_SERVICE_NAME"] == "pagedinfer"
    assert env["OTEL_TRACES_SAMPLER"].startswith("parentbased_")  # a caller's decision wins
    assert 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1


def test_each_hop_reaches_a_listening_port(docs):
    url = urlsplit(server_env(docs)["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
    collector, port = container_port(docs, url.hostname, url.port)
    config = yaml.safe_load(collector_config(docs))
    receiver_ports = {int(p["endpoint"].rpartition(":")[2]) for p in config["receivers"]["otlp"]["protocols"].values()}
    assert port in receiver_ports
    host, _, jaeger_port = config["exporters"]["otlp"]["endpoint"].rpartition(":")
    jaeger, port = container_port(docs, host, int(jaeger_port))
    assert port == 4317  # the all-in-one's OTLP/gRPC receiver
    [container] = jaeger["spec"]["template"]["spec"]["containers"]
    assert container["image"] == JAEGER_IMAGE
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["JAEGER_LISTEN_HOST"] == "0.0.0.0"  # else it listens on localhost only
    assert collector["metadata"]["name"] != jaeger["metadata"]["name"]


def test_the_server_pods_are_the_only_ones_patched(docs):
    assert the(docs, "NetworkPolicy")  # the base policy still admits only the gateway and Prometheus
    for deployment in of_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in names) == (container["name"] == "server")


def _validate(config_text: str, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / "collector.yaml"
    path.write_text(config_text)
    return subprocess.run([str(go_tool("jaeger")), "validate", "--config", f"file:{path}"],
                          capture_output=True, text=True, timeout=60)


def test_a_real_collector_accepts_the_config(docs, tmp_path):
    done = _validate(collector_config(docs), tmp_path)
    assert done.returncode == 0, done.stderr
    # ... and the same check refuses a broken one.
    broken = _validate(collector_config(docs).replace("memory_limiter, batch", "memory_limiter, batchy"), tmp_path)
    assert broken.returncode != 0 and "batchy" in broken.stderr
