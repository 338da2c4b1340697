"""Do KV-cache events slow serving? Throughput with events off and on, in one run.

Two `pagedinfer serve` processes on the same model and settings, both up for
the whole run: one has --kv-events-config on, with a replay socket, and a
subscriber that connects and then never reads (a stalled router), so the PUB
socket's queue fills. Each is warmed up, then they take turns, --repeats
rounds in alternating order (off-on, on-off, ...), so a drift in the
machine's load falls on both sides and neither pays a cold start. Each turn
is the same requests at max concurrency c (default 64: prompts as token
ids, EOS ignored, greedy), distinct prompts so blocks are stored and evicted
all along. Reports output tok/s, the median of the rounds' on / off ratios,
and the events the server dropped. The target: on / off >= 0.98.

    nice -n 10 python -m bench.kv_events --repeats 8 --out bench/out/kv_events.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import zmq

from bench.common import Workload, build_requests, git_commit, machine_info, now_utc, prompt_vocab_size, write_json
from bench.overhead import engine_args, prepare_model
from bench.peers.servers import ServerProcess, free_port
from bench.serve import ClientConfig, run_level


def events_config(pub_port: int, replay_port: int) -> str:
    return json.dumps({"enable_kv_cache_events": True, "endpoint": f"tcp://*:{pub_port}",
                       "replay_endpoint": f"tcp://*:{replay_port}", "topic": "kv@bench@model"})


@contextlib.contextmanager
def serving(args: argparse.Namespace, model: str, num_requests: int, events_on: bool, log: Path):
    """A server, warmed up; with events on, its PUB socket has a subscriber that never reads."""
    port = free_port()
    engine = engine_args(args, args.concurrency)
    command = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--max-queued-requests", str(num_requests),
               *[f"--{key.replace('_', '-')}={value}" for key, value in engine.items() if key != "device"]]
    pub_port = free_port()
    if events_on:
        command += ["--kv-events-config", events_config(pub_port, free_port())]
    cfg = ClientConfig(base_url=f"http://127.0.0.1:{port}", model=Path(model).name, prompt_format="ids")
    env = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    context = zmq.Context()
    stalled = context.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        with ServerProcess(command, cfg.base_url + "/ready", log, env, startup_timeout=600):
            if events_on:
                stalled.connect(f"tcp://127.0.0.1:{pub_port}")  # and never reads
            yield cfg
    finally:
        stalled.close(linger=0)
        context.term()


def measure(cfg: ClientConfig, requests: list, concurrency: int, label: str) -> dict:
    metrics = run_level(cfg, requests, concurrency, label=label)["metrics"]
    text = httpx.get(cfg.base_url + "/metrics", timeout=10).text
    dropped = next((float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("pagedinfer_kv_events_dropped_total")), 0.0)
    return {"output_throughput": metrics["output_throughput"], "failed": metrics["failed"],
            "kv_events_dropped": dropped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen3", help="a model folder, or tiny-qwen3 for random weights")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6, help="off/on rounds; the ratio is their median")
    parser.add_argument("--out", default=None, help="JSON report")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pagedinfer-kv-events-"))
    try:
        model = prepare_model(args.model, args.device, workdir / "model")
        workload = Workload(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len, seed=0)
        requests = build_requests(workload, prompt_vocab_size(model))
        rounds = []
        with contextlib.ExitStack() as stack:
            servers = {on: stack.enter_context(serving(args, model, len(requests), on, workdir / f"server-{on}.log"))
                       for on in (False, True)}
            for on, cfg in servers.items():  # warm-up, not counted
                measure(cfg, requests[: args.concurrency], args.concurrency, label="warm-up")
            for i in range(args.repeats):
                order = (False, True) if i % 2 == 0 else (True, False)
                pair = {on: measure(servers[on], requests, args.concurrency, f"events {'on' if on else 'off'}")
                        for on in order}
                rounds.append(pair)
                print(f"round {i}: off {pair[False]['output_throughput']:8.1f} tok/s, on "
                      f"{pair[True]['output_throughput']:8.1f} tok/s (dropped {pair[True]['kv_events_dropped']:.0f}), "
                      f"on / off {pair[True]['output_throughput'] / pair[False]['output_throughput']:.3f}", flush=True)
        ratio = statistics.median(p[True]["output_throughput"] / p[False]["output_throughput"] for p in rounds)
        print(f"median on / off over {len(rounds)} rounds: {ratio:.3f}")
        runs = [{"events": on, **run} for pair in rounds for on, run in pair.items()]
        if args.out:
            write_json(args.out, {"when": now_utc(), "commit": git_commit(), "machine": machine_info(),
                                  "args": vars(args), "runs": runs, "ratio": ratio})
        return 0 if all(r["failed"] == 0 for r in runs) else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
