"""Whether `serve` traces, where its spans go, and what is wrong with that.

Read from the --otlp-traces-endpoint flag and the standard OTEL_* variables
without importing OpenTelemetry: `serve` decides here, at start-up, and
only a server that traces imports server/tracing.py and the SDK.
"""

from __future__ import annotations

import importlib.util
import os
from urllib.parse import urlsplit

PROTOCOLS = ("grpc", "http/protobuf")  # the OTLP exporters the SDK has for Python


def tracing_endpoint(flag: str | None) -> str | None:
    """The OTLP traces endpoint: the flag's, else the standard variables', else
    None, and tracing is off."""
    return (flag or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def otlp_protocol() -> str:
    """The OTLP protocol the variables ask for; grpc (as vLLM's default) without them."""
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                          os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")).strip()


def check_tracing(endpoint: str) -> str | None:
    """What is wrong with the endpoint URL, the protocol variable or the install, or None."""
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        return "tracing needs the OpenTelemetry SDK: pip install 'pagedinfer[tracing]'"
    protocol = otlp_protocol()
    if protocol not in PROTOCOLS:
        return (f"the OTLP protocol (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL) is "
                f"{protocol!r}: choose from {', '.join(PROTOCOLS)}")
    try:
        url = urlsplit(endpoint)
        port = url.port
    except ValueError as exc:
        return f"the OTLP traces endpoint {endpoint!r} is not a URL: {exc}"
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"the OTLP traces endpoint {endpoint!r} is not an http:// or https:// URL with a host"
    if protocol == "grpc" and port is None:
        return f"the OTLP traces endpoint {endpoint!r} names no port (the collector's gRPC port is 4317)"
    return None
