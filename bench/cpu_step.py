"""Where a CPU decode step goes: torch ops and milliseconds per step, by op.

Fills the engine with `batch` requests (ShareGPT-like prompt lengths, so the
contexts differ as they do when serving), lets every prompt finish, then
times `steps` decode steps and profiles a few more with torch.profiler. Each
configuration runs in a fresh subprocess, one after the other, in the same
run: by default the torch reference ops (`PAGEDINFER_CPU_KERNELS=0`, what
the engine ran before the C++ kernels) against the C++ kernels; `cpp-flinear`
is the C++ kernels with bf16 linears on F.linear instead of the AVX512-BF16
kernel (the same as `cpp` in float32 or on CPUs without it).

    python -m bench.cpu_step --batch 1,16,48 --out bench/out/cpu_step.json

Prints, per batch size and configuration: ms per step (median of `steps`),
torch ops per step, and the ops that take the most time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    REPO_ROOT, Workload, build_requests, default_model, git_commit, machine_info, now_utc, write_json,
)

if TYPE_CHECKING:
    from inference.engine import LLMEngine

# cpp-flinear: the C++ kernels, but bf16 linears on torch's F.linear (kernels/cpu_linear.py's switch).
CONFIGS = {
    "reference": {"PAGEDINFER_CPU_KERNELS": "0"},
    "cpp": {"PAGEDINFER_CPU_KERNELS": "1", "PAGEDINFER_CPU_BF16_LINEAR": "1"},
    "cpp-flinear": {"PAGEDINFER_CPU_KERNELS": "1", "PAGEDINFER_CPU_BF16_LINEAR": "0"},
}


def decoding_engine(model: str, dtype: str, batch: int, num_steps: int) -> LLMEngine:
    """An engine with `batch` requests whose prompts are all in: the next `num_steps` steps decode only."""
    from inference import SamplingParams
    from inference.config import EngineConfig
    from inference.engine import LLMEngine

    engine = LLMEngine(EngineConfig.create(model=model, dtype=dtype, max_num_seqs=max(batch, 1)))
    workload = Workload(dataset="sharegpt", num_prompts=batch, max_input_len=600, seed=batch)
    for i, request in enumerate(build_requests(workload, engine.core.vocab_size)):
        params = SamplingParams(temperature=0.0, max_tokens=num_steps, ignore_eos=True)
        engine.add_request(str(i), request.prompt_ids, params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def measure(model: str, dtype: str, batch: int, steps: int, profile_steps: int, top: int) -> dict:
    """In this process: fill, time and profile decode steps at `batch`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import kernels

    engine = decoding_engine(model, dtype, batch, steps + profile_steps + 8)
    config = engine.config
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profile_steps):
            engine.step()
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    by_self = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    engine.shutdown()
    return {
        "batch": batch, "dtype": config.dtype, "cpu_ops": kernels.cpu_kernels(), "threads": torch.get_num_threads(),
        "ms_per_step": statistics.median(times) * 1e3,
        "ops_per_step": sum(e.count for e in events) / profile_steps,
        "top_ops": [{"op": e.key, "calls_per_step": e.count / profile_steps,
                     "ms_per_step": e.self_cpu_time_total / 1e3 / profile_steps} for e in by_self[:top]],
    }


def run_config(name: str, args: argparse.Namespace, batch: int) -> dict:
    command = [sys.executable, "-m", "bench.cpu_step", "--child", "--model", args.model, "--dtype", args.dtype,
               "--batch", str(batch), "--steps", str(args.steps), "--profile-steps", str(args.profile_steps),
               "--top", str(args.top)]
    env = {**os.environ, **CONFIGS[name]}
    proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} at batch {batch} failed:\n{proc.stderr[-3000:]}")
    return {"config": name, **json.loads(proc.stdout.strip().splitlines()[-1])}


def table(results: list[dict]) -> str:
    lines = ["| batch | CPU ops | ms / step | torch ops / step | top ops (ms / step) |", "|---:|---|---:|---:|---|"]
    for r in results:
        tops = ", ".join(f"{t['op']} {t['ms_per_step']:.1f}" for t in r["top_ops"][:5])
        lines.append(f"| {r['batch']} | {r['cpu_ops']} | {r['ms_per_step']:.1f} | {r['ops_per_step']:.0f} | {tops} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the prepared SmolLM2)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", default="1,16,48", help="comma-separated decode batch sizes")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {','.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or default_model()
    if args.child:
        print(json.dumps(measure(args.model, args.dtype, int(args.batch), args.steps, args.profile_steps, args.top)))
        return 0
    results = [run_config(name, args, int(b)) for b in args.batch.split(",") for name in args.configs.split(",")]
    print(table(results))
    if args.out:
        write_json(args.out, {"date": now_utc(), "commit": git_commit(), "machine": machine_info(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
