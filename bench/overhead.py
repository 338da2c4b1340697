"""What the HTTP server costs: offline `LLM.generate` against `pagedinfer serve`
on the same requests, in one run.

At each concurrency c (default 1, 64, 256) both sides get the same requests
(100-token prompts as token ids, 128 output tokens, EOS ignored, greedy):
  offline   the engine in this process, fed c requests at a time and stepped
            directly, timing every step (ITL = gaps between a request's steps);
  server    `pagedinfer serve` on the same model and engine settings, streamed
            by bench/serve.py's client at max concurrency c.
Offline runs first and is freed before the server starts, so the two never
share the CPU. Both get the same --torch-threads (default 1 on the CPU: on a
small box the server's front end needs a core of its own, and a second torch
thread only spins against it). With --repeats N every number is the median
of N runs (a shared box is noisy). Reports tok/s, ITL p50/p99 and
server / offline.

    python -m bench.overhead --out bench/out/overhead.json                 # tiny Qwen3 on the CPU
    python -m bench.overhead --model Qwen3-0.6B --device cuda --repeats 3  # that shape, random weights
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Request, Workload, build_requests, git_commit, machine_info, now_utc, prompt_vocab_size, summarize, write_json,
)
from bench.serve import ClientConfig, run_level

BLOCK_SIZE = 16


def prepare_model(name: str, device: str, folder: Path) -> str:
    """A model folder: `name` itself, or random weights of a known shape written to `folder`."""
    import torch

    from bench.gpu_models import CPU_MODELS, MODELS, write_model

    specs = {**CPU_MODELS, **MODELS}
    if name not in specs:
        return name
    write_model(folder, specs[name], torch.float32 if device == "cpu" else torch.bfloat16, device)
    return str(folder)


def level_requests(args: argparse.Namespace, concurrency: int, vocab_size: int, index: int) -> list[Request]:
    """Whole waves of c requests: offline feeds them a wave at a time, the client keeps c in flight."""
    num_prompts = max(args.min_prompts, args.waves * concurrency)
    workload = Workload(num_prompts=num_prompts, input_len=args.input_len, output_len=args.output_len, seed=index)
    return build_requests(workload, vocab_size)


def engine_args(args: argparse.Namespace, max_concurrency: int) -> dict:
    max_len = args.input_len + args.output_len
    return dict(dtype=args.dtype, device=args.device, max_num_seqs=max_concurrency,
                max_model_len=BLOCK_SIZE * math.ceil(max_len / BLOCK_SIZE),
                num_kv_blocks=max_concurrency * math.ceil(max_len / BLOCK_SIZE) + 16)


def run_offline(llm, requests: list[Request], concurrency: int) -> dict:
    from inference import SamplingParams

    engine = llm.engine
    token_times: dict[str, list[float]] = {}
    num_tokens = 0
    start = time.perf_counter()
    for wave in range(0, len(requests), concurrency):
        for i, req in enumerate(requests[wave:wave + concurrency], start=wave):
            params = SamplingParams(temperature=0.0, max_tokens=req.output_len, ignore_eos=True)
            engine.add_request(str(i), req.prompt_ids, params)
            token_times[str(i)] = []
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for output in outputs:
                if sum(output.new_token_counts):
                    token_times[output.request_id].append(now)
                    num_tokens += sum(output.new_token_counts)
    duration = time.perf_counter() - start
    itl = [b - a for times in token_times.values() for a, b in zip(times, times[1:])]
    return {"output_throughput": num_tokens / duration, "duration_s": duration, "itl_ms": summarize(itl)}


def offline_pass(args: argparse.Namespace, model: str, levels: list[int], level_reqs: list[list[Request]]) -> list:
    import torch

    from inference import LLM, SamplingParams

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    llm = LLM(model=model, **engine_args(args, max(levels)))
    llm.generate([level_reqs[0][0].prompt_ids[:16]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    runs = [[run_offline(llm, reqs, c) for c, reqs in zip(levels, level_reqs)] for _ in range(args.repeats)]
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the server's core sizes its KV cache from the free memory
    return runs


def server_pass(args: argparse.Namespace, model: str, levels: list[int], level_reqs: list[list[Request]],
                log: Path) -> list:
    from bench.peers.servers import ServerProcess, free_port

    port = free_port()
    engine = engine_args(args, max(levels))
    command = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--max-queued-requests", str(max(args.min_prompts, args.waves * max(levels))),
               *[f"--{key.replace('_', '-')}={value}" for key, value in engine.items() if key != "device"]]
    cfg = ClientConfig(base_url=f"http://127.0.0.1:{port}", model=Path(model).name, prompt_format="ids")
    env = {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else None
    with ServerProcess(command, cfg.base_url + "/ready", log, env, startup_timeout=600):
        return [[run_level(cfg, reqs, c, label=f"server c={c}", seed=i)["metrics"]
                 for i, (c, reqs) in enumerate(zip(levels, level_reqs))] for _ in range(args.repeats)]


def _median(runs: list[list[dict]], index: int, key: str, sub: str | None = None) -> float:
    values = [run[index][key] if sub is None else run[index][key][sub] for run in runs]
    return float(statistics.median(values))


def summarize_levels(levels: list[int], offline: list, server: list) -> list[dict]:
    rows = []
    for i, c in enumerate(levels):
        off_tps, srv_tps = _median(offline, i, "output_throughput"), _median(server, i, "output_throughput")
        off_p50, srv_p50 = _median(offline, i, "itl_ms", "median"), _median(server, i, "itl_ms", "median")
        rows.append({
            "concurrency": c,
            "offline": {"tok_s": off_tps, "itl_p50_ms": off_p50, "itl_p99_ms": _median(offline, i, "itl_ms", "p99")},
            "server": {"tok_s": srv_tps, "itl_p50_ms": srv_p50, "itl_p99_ms": _median(server, i, "itl_ms", "p99"),
                       "tpot_p50_ms": _median(server, i, "tpot_ms", "median"),
                       "failed": max(run[i]["failed"] for run in server)},
            "throughput_ratio": srv_tps / off_tps if off_tps else 0.0,
            "itl_p50_delta_ms": srv_p50 - off_p50,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| c | offline tok/s | offline ITL p50 / p99 ms | server tok/s | server ITL p50 / p99 ms "
             "| server ÷ offline | ITL p50 Δ ms |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        off, srv = r["offline"], r["server"]
        lines.append(f"| {r['concurrency']} | {off['tok_s']:,.0f} | {off['itl_p50_ms']:.2f} / {off['itl_p99_ms']:.2f} "
                     f"| {srv['tok_s']:,.0f} | {srv['itl_p50_ms']:.2f} / {srv['itl_p99_ms']:.2f} "
                     f"| {r['throughput_ratio']:.2f}× | {r['itl_p50_delta_ms']:+.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen3",
                        help="a model folder, or tiny-qwen3 / Qwen3-0.6B / ... for random weights of that shape")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of the engine on both sides (default: 1 on the CPU, torch's own on a GPU)")
    parser.add_argument("--levels", default="1,64,256", help="concurrencies, comma-separated")
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency")
    parser.add_argument("--min-prompts", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side; numbers are medians")
    parser.add_argument("--out", default=None, help="JSON report")
    parser.add_argument("--log", default=None, help="server log (default: a temp file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.torch_threads is None and args.device == "cpu":
        args.torch_threads = 1
    levels = [int(part) for part in args.levels.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="pagedinfer-overhead-"))
    try:
        model = prepare_model(args.model, args.device, workdir / "model")
        vocab_size = prompt_vocab_size(model)
        level_reqs = [level_requests(args, c, vocab_size, i) for i, c in enumerate(levels)]
        print(f"[overhead] offline: {args.repeats} x levels {levels}", flush=True)
        offline = offline_pass(args, model, levels, level_reqs)
        print(f"[overhead] server: {args.repeats} x levels {levels}", flush=True)
        log = Path(args.log) if args.log else workdir / "server.log"
        server = server_pass(args, model, levels, level_reqs, log)
        rows = summarize_levels(levels, offline, server)
        report = {
            "when": now_utc(), "commit": git_commit(), "machine": machine_info(), "model": args.model,
            "device": args.device, "torch_threads": args.torch_threads, "input_len": args.input_len, "output_len": args.output_len,
            "repeats": args.repeats, "levels": rows, "raw": {"offline": offline, "server": server},
            "note": "medians over repeats; the server's ITL is the gap between streamed chunks, "
                    "and a chunk may carry several tokens when the front end catches up",
        }
        print(format_table(rows))
        if args.out:
            write_json(args.out, report)
        return 0 if all(r["server"]["failed"] == 0 for r in rows) else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
