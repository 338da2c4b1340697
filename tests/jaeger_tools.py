"""A real Jaeger (v1.75.0, pinned in tests/tools/jaeger) for the tracing tests.

`start_jaeger()` runs the `jaeger` binary (the OpenTelemetry-collector based
all-in-one) on free loopback ports with in-memory storage: OTLP over gRPC
and HTTP in, and Jaeger's own query API out, which the tests read traces
back from exactly as Jaeger's UI does. The binary is built once by
tests/go_tools.py (minutes, cold) and cached.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from go_tools import go_tool
from server_fixtures import free_port, terminate

READY_TIMEOUT_S = 60

# The all-in-one's pipeline (cmd/jaeger/internal/all-in-one.yaml in the
# module) cut to OTLP in, memory storage, the query API out; no telemetry
# ports of its own, so two tests never collide on a fixed port.
CONFIG = """
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query_port}
    grpc:
      endpoint: 127.0.0.1:{query_grpc_port}{ui}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
      http:
        endpoint: 127.0.0.1:{http_port}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""


@dataclass
class Jaeger:
    process: subprocess.Popen
    grpc_port: int
    http_port: int
    query_port: int
    log_path: Path

    @property
    def otlp_grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def otlp_http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.query_port}"

    def trace(self, trace_id: str, timeout: float = 20.0, num_spans: int = 1) -> dict[str, Any]:
        """The trace as Jaeger's query API returns it, once it holds `num_spans`
        spans; spans reach storage a batch interval after they end."""
        deadline = time.monotonic() + timeout
        while True:
            answer = httpx.get(f"{self.query_url}/api/traces/{trace_id}", timeout=5)
            if answer.status_code == 200:
                [trace] = answer.json()["data"]
                if len(trace["spans"]) >= num_spans:
                    return trace
            if time.monotonic() > deadline:
                raise AssertionError(f"Jaeger has no trace {trace_id} after {timeout} s "
                                     f"({answer.status_code}: {answer.text[:300]})\n{self.log_tail()}")
            time.sleep(0.2)

    def services(self) -> list[str]:
        return httpx.get(f"{self.query_url}/api/services", timeout=5).json()["data"] or []

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def stop(self) -> None:
        terminate(self.process)


def start_jaeger(ui_assets: Path | None = None) -> Jaeger:
    """A fresh Jaeger with empty storage, answering its query API. The Go
    module holds no UI (its assets are built by npm in jaeger-ui's own
    repository): `ui_assets`, a built jaeger-ui folder, adds one."""
    binary = go_tool("jaeger")
    ports = {name: free_port() for name in ("grpc_port", "http_port", "query_port", "query_grpc_port")}
    folder = Path(tempfile.mkdtemp(prefix="pagedinfer-jaeger-"))
    config = folder / "config.yaml"
    ui = f"\n    ui:\n      assets_path: {ui_assets}" if ui_assets is not None else ""
    config.write_text(CONFIG.format(ui=ui, **ports))
    log_path = folder / "jaeger.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(binary), "--config", str(config)], cwd=folder,
                                   stdout=log, stderr=subprocess.STDOUT)
    jaeger = Jaeger(process, ports["grpc_port"], ports["http_port"], ports["query_port"], log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"jaeger exited with {process.returncode}:\n{jaeger.log_tail()}")
        try:
            if httpx.get(f"{jaeger.query_url}/api/services", timeout=2).status_code == 200:
                return jaeger
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            jaeger.stop()
            raise RuntimeError(f"jaeger not answering after {READY_TIMEOUT_S} s:\n{jaeger.log_tail()}")
        time.sleep(0.2)


def span_tags(span: dict[str, Any]) -> dict[str, Any]:
    """A Jaeger span's tags (its attributes) by key."""
    return {tag["key"]: tag["value"] for tag in span["tags"]}
