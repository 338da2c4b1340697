"""Does tracing slow serving? Throughput with tracing off and on, in one run.

Two `pagedinfer serve` processes on the same model and settings run side by
side (started in one order for half the rounds, in the other for the rest):
one without tracing, one exporting a span per request over OTLP/gRPC
to a real Jaeger (v1.75.0, tests/tools/jaeger, built once and cached). The
same requests (prompts as token ids, EOS ignored, greedy) go to one, then
the other, at max concurrency c (default 16), --repeats rounds whose order
alternates (off-on, on-off, ...), so a drift in the machine's load falls on
both sides; the idle server only waits.

Reports per round the output tok/s and the CPU seconds the server's front-end
process (all its threads: the event loop, the span processor's, the
exporter's) spent per output token, then the medians of the rounds' ratios:
throughput on / off, and front-end CPU per token off / on. All of tracing's
work is done in the front end (the engine core only fills three more fields
per output), so the second isolates its cost better than wall-clock
throughput on a shared machine, though contention moves it too (a fuller
batch spreads the front end's per-step work over more tokens). Also the
traces Jaeger received and the spans the server dropped. The target: on / off >= 0.97.

    nice -n 10 python -m bench.tracing --repeats 10 --out bench/out/tracing.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import Workload, build_requests, git_commit, machine_info, now_utc, prompt_vocab_size, write_json
from bench.overhead import engine_args, prepare_model
from bench.peers.servers import REPO_ROOT, ServerProcess, free_port
from bench.serve import ClientConfig, run_level

SERVICE = "pagedinfer-bench"


def start_jaeger():
    """The tests' Jaeger launcher (tests/jaeger_tools.py): one Jaeger for both benchmarks and tests."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from jaeger_tools import start_jaeger as start

    return start()


def server(args: argparse.Namespace, model: str, num_requests: int, log: Path, endpoint: str | None):
    """A ServerProcess (not started) and its client config; tracing on when `endpoint` is given."""
    port = free_port()
    engine = engine_args(args, args.concurrency)
    command = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--max-queued-requests", str(num_requests),
               *[f"--{key.replace('_', '-')}={value}" for key, value in engine.items() if key != "device"]]
    if endpoint is not None:
        command += ["--otlp-traces-endpoint", endpoint]
    env = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "OTEL_SERVICE_NAME": SERVICE}
    cfg = ClientConfig(base_url=f"http://127.0.0.1:{port}", model=Path(model).name, prompt_format="ids")
    return ServerProcess(command, cfg.base_url + "/ready", log, env, startup_timeout=600), cfg


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads) so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def level(process: ServerProcess, cfg: ClientConfig, requests: list, concurrency: int, on: bool) -> dict:
    """One benchmark level: output tok/s, and the front end's CPU seconds per output token."""
    cpu = cpu_seconds(process.proc.pid)
    metrics = run_level(cfg, requests, concurrency, label=f"tracing {'on' if on else 'off'}")["metrics"]
    cpu = cpu_seconds(process.proc.pid) - cpu
    return {"tracing": on, "output_throughput": metrics["output_throughput"], "failed": metrics["failed"],
            "cpu_s_per_token": cpu / max(metrics["total_output_tokens"], 1)}


def num_dropped(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return next((float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("pagedinfer_trace_spans_dropped_total")), 0.0)


def num_traces(query_url: str) -> int:
    answer = httpx.get(f"{query_url}/api/traces", timeout=30,
                       params={"service": SERVICE, "limit": 100000, "lookback": "1h"})
    return len(answer.json()["data"] or [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen3", help="a model folder, or tiny-qwen3 for random weights")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10, help="off/on rounds; numbers are medians")
    parser.add_argument("--out", default=None, help="JSON report")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pagedinfer-tracing-"))
    jaeger = start_jaeger()
    try:
        model = prepare_model(args.model, args.device, workdir / "model")
        workload = Workload(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len, seed=0)
        requests = build_requests(workload, prompt_vocab_size(model))
        rounds, dropped = [], 0.0
        for half, start_order in enumerate(((False, True), (True, False))):
            # The server started second ran faster in trials, whatever its
            # tracing: each half of the rounds starts them in the other order.
            servers = {on: server(args, model, len(requests), workdir / f"server-{half}-{on}.log",
                                  jaeger.otlp_grpc_endpoint if on else None) for on in start_order}
            with contextlib.ExitStack() as stack:
                for process, _ in servers.values():
                    stack.enter_context(process)
                for i in range(len(rounds), args.repeats * (half + 1) // 2):
                    order = (False, True) if i % 2 == 0 else (True, False)
                    runs = {on: level(*servers[on], requests, args.concurrency, on) for on in order}
                    rounds.append(runs)
                    off, on = runs[False], runs[True]
                    print(f"round {i}: off {off['output_throughput']:7.1f} tok/s {off['cpu_s_per_token'] * 1e3:.3f} "
                          f"ms, on {on['output_throughput']:7.1f} tok/s {on['cpu_s_per_token'] * 1e3:.3f} ms front-end "
                          f"CPU per token; on / off {on['output_throughput'] / off['output_throughput']:.3f}, "
                          f"front-end CPU off / on {off['cpu_s_per_token'] / on['cpu_s_per_token']:.3f}", flush=True)
                dropped += num_dropped(servers[True][1].base_url)
        traces = num_traces(jaeger.query_url)  # after the traced server's shutdown flushed its last spans
        ratio = statistics.median(r[True]["output_throughput"] / r[False]["output_throughput"] for r in rounds)
        cpu_ratio = statistics.median(r[False]["cpu_s_per_token"] / r[True]["cpu_s_per_token"] for r in rounds)
        # The warm-up request of each level is traced too.
        print(f"median over {len(rounds)} rounds: throughput on / off {ratio:.3f}, front-end CPU per token off / on "
              f"{cpu_ratio:.3f}; Jaeger holds {traces} traces of {args.repeats * (len(requests) + 1)} traced "
              f"requests, {dropped:.0f} spans dropped")
        runs = [run for r in rounds for run in r.values()]
        if args.out:
            write_json(args.out, {"when": now_utc(), "commit": git_commit(), "machine": machine_info(),
                                  "args": vars(args), "runs": runs, "ratio": ratio, "cpu_ratio": cpu_ratio,
                                  "traces_in_jaeger": traces, "spans_dropped": dropped})
        return 0 if all(r["failed"] == 0 for r in runs) else 1
    finally:
        jaeger.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
