"""The autoscaling queries of deploy/k8s, run by a real Prometheus that
scrapes a real server under load.

The server runs with --max-num-seqs 2 and a small KV cache, and a load of
more concurrent streams than that: the KEDA and prometheus-adapter queries
(read from the manifests by k8s_queries, not copied) must then see waiting
requests > 0 and KV usage in (0, 1], and both back at 0 once the load
stops, with each request the load sent counted by the server. `promtool
check rules` must parse every query.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from k8s_queries import adapter_config, adapter_queries, scaling_queries
from prometheus_client.parser import text_string_to_metric_families
from prometheus_tools import require
from server_fixtures import free_port, start_server, terminate

pytestmark = pytest.mark.slow

SCRAPE_INTERVAL_S = 1
IN_FLIGHT = 6  # > --max-num-seqs, so requests wait
MAX_REQUESTS = 60
LOAD_MAX_S = 40
UNDER_LOAD_TIMEOUT_S = 30
IDLE_TIMEOUT_S = 20


def _label_value(queries: dict[str, str], label: str) -> str:
    values = {v for q in queries.values() for v in re.findall(rf'\b{label}="([^"]*)"', q)}
    assert len(values) == 1, f"the queries disagree on {label}: {values}"
    return values.pop()


def all_queries() -> dict[str, str]:
    """Every scaling query that ships: KEDA's and prometheus-adapter's."""
    return {
        **{f"keda_{name}": q for name, q in scaling_queries().items()},
        **{f"adapter_{name}": q for name, q in adapter_queries().items()},
    }


def test_promtool_parses_every_query(tmp_path: Path):
    config = adapter_config()
    expressions = {**all_queries(), **{
        f"adapter_series_{i}": rule["seriesQuery"]
        for i, rule in enumerate(config.get("rules", []) + config.get("externalRules", []))
    }}
    rules = {"groups": [{"name": "pagedinfer-autoscaling", "rules": [
        {"record": f"pagedinfer:{name}", "expr": expr} for name, expr in expressions.items()
    ]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = subprocess.run([require("promtool"), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in done.stdout


class Prometheus:
    def __init__(self, folder: Path, target: str, labels: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                       "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            # In a cluster the ServiceMonitor adds namespace and pod; here the static labels do.
            "scrape_configs": [{"job_name": "pagedinfer",
                                "static_configs": [{"targets": [target], "labels": labels}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = folder / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [require("prometheus"), f"--config.file={folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def query(self, promql: str) -> list[float]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        body = response.json()
        assert body["status"] == "success", body
        return [float(sample["value"][1]) for sample in body["data"]["result"]]

    def wait(self, what: str, condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except (httpx.TransportError, ValueError):  # not up yet, or not answering JSON yet
                pass
            assert self.process.poll() is None, f"prometheus exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"{what} not seen in {timeout} s"
            time.sleep(0.25)

    def stop(self) -> None:
        terminate(self.process)


class Load:
    """IN_FLIGHT streamed completions at a time on a thread of its own, until
    stopped (in-flight streams are then dropped, which aborts them), or until
    MAX_REQUESTS or LOAD_MAX_S."""

    def __init__(self, base_url: str, model: str) -> None:
        self.base_url, self.model = base_url, model
        self.stopping = threading.Event()
        self.started = self.accepted = self.finished = 0  # accepted: answered 200, so the server has it
        self.errors: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="load")
        self.thread.start()

    async def _one(self, client: httpx.AsyncClient, index: int) -> None:
        body = {"model": self.model, "prompt": f"Story {index}: once upon a time", "max_tokens": 48,
                "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                self.errors.append(f"{response.status_code}: {(await response.aread())[:300]!r}")
                return
            self.accepted += 1
            async for _ in response.aiter_lines():
                pass
        self.finished += 1

    async def _main(self) -> None:
        deadline = time.monotonic() + LOAD_MAX_S
        async with httpx.AsyncClient(base_url=self.base_url, timeout=60) as client:
            tasks: set[asyncio.Task] = set()
            while not self.stopping.is_set() and time.monotonic() < deadline:
                while len(tasks) < IN_FLIGHT and self.started < MAX_REQUESTS:
                    tasks.add(asyncio.create_task(self._one(client, self.started)))
                    self.started += 1
                if not tasks:
                    break
                done, tasks = await asyncio.wait(tasks, timeout=0.1)
                self.errors += [repr(t.exception()) for t in done if t.exception() is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(server, prometheus scraping it, queries) for the model and namespace the queries name."""
    require("prometheus")
    queries = all_queries()
    model, namespace = _label_value(queries, "model_name"), _label_value(queries, "namespace")
    server = start_server("--served-model-name", model, "--max-num-seqs", "2", "--num-kv-blocks", "32",
                          "--max-model-len", "256", "--metrics-compat", "vllm")
    prometheus = None
    try:
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), server.base_url.removeprefix("http://"),
                                {"namespace": namespace, "pod": "pagedinfer-0"})
        prometheus.wait("a successful scrape", lambda: prometheus.query('up{job="pagedinfer"}') == [1.0], 30)
        yield server, prometheus, queries
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def _requests_counted(server) -> float:
    """Finished requests (each n=1 here), by any reason, as the server's /metrics counts them."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "pagedinfer_request_success_total")


def test_scaling_queries_follow_the_load(stack):
    server, prometheus, queries = stack

    def values() -> dict[str, list[float]]:
        return {name: prometheus.query(q) for name, q in queries.items()}

    # Idle: the series exist with the labels the queries filter on, and read 0.
    prometheus.wait("idle values", lambda: all(v == [0.0] for v in values().values()), 10)
    config = adapter_config()
    for rule in config["rules"] + config["externalRules"]:
        found = httpx.get(f"{prometheus.url}/api/v1/series", params={"match[]": rule["seriesQuery"]}).json()
        assert found["data"], f"prometheus-adapter's seriesQuery {rule['seriesQuery']} matches no series"

    seen: dict[str, list[float]] = {name: [] for name in queries}
    out_of_range: list[tuple[str, float]] = []

    def busy_enough() -> bool:
        for name, result in values().items():
            seen[name] += result
            if "kv_usage" in name:
                out_of_range.extend((name, v) for v in result if not 0 <= v <= 1)
        return all(any(v > 0 for v in results) for results in seen.values())

    load = Load(server.base_url, _label_value(queries, "model_name"))
    try:
        prometheus.wait("waiting > 0 and KV usage > 0 under load", busy_enough, UNDER_LOAD_TIMEOUT_S)
    finally:
        load.stop()
    assert not out_of_range, f"KV usage outside [0, 1]: {out_of_range}"
    assert not load.errors, load.errors[:5]

    # The load gone (finished or dropped), every query is back at 0.
    prometheus.wait("all queries back at 0", lambda: all(v == [0.0] for v in values().values()), IDLE_TIMEOUT_S)
    # And the server counted each request the load had sent, run out or dropped
    # (those the load cancelled before their response began may or may not have reached it).
    prometheus.wait("every accepted request counted", lambda: _requests_counted(server) >= load.accepted, 10)
    assert _requests_counted(server) <= load.started
    print(f"{load.started} requests ({load.accepted} accepted, {load.finished} finished); max under load: "
          + ", ".join(f"{name}={max(v):g}" for name, v in seen.items()))


def test_cache_config_info_reads_as_vllms(stack):
    _, prometheus, _ = stack
    query = 'vllm:cache_config_info{block_size="16", num_gpu_blocks="32", job="pagedinfer"}'
    prometheus.wait("vllm:cache_config_info scraped", lambda: prometheus.query(query) == [1.0], 10)
