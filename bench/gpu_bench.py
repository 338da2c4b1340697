"""Offline engine on real model shapes with random weights, against the roofline.

For each model (configs inline, weights random: shapes are what speed depends
on), in this order and within one time budget:
  1. transformers `generate` on a 16-request subset (unless --no-transformers;
     first, so its memory is gone before our KV cache is sized);
  2. one engine per `--graphs` mode, the graphs-off one (`enforce_eager=True`)
     first, each loaded fresh (the KV cache is sized from free memory):
     decode step time at batch 1/64/256 against the roofline
     batch x HBM bandwidth / (weight bytes + KV bytes read per step), and with
     --profile a torch.profiler summary of decode steps at batch 64
     (bench/gpu_profile.py: host time, GPU busy fraction, launches per step);
  3. on the last engine (graphs on, the default) our engine on the subset, then
     the nano-vllm workload: 256 requests, input and output lengths uniform in
     100-1024, EOS ignored, temperature 0.6 (last: at the deadline it is cut
     short and reported as such, the other numbers are already in).
Run through bench/gpu.sh; `--cpu` runs the same code on tiny shapes here
(where "graphs on" runs the padded decode batches eagerly). For MoE models
the roofline counts only the experts a step's tokens route to
(`gpu_models.active_weight_bytes`); `--dummy-weights` writes no weights and
has the engine build them on the device (Qwen3-30B-A3B: 61 GB of bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import Request, git_commit, machine_info, now_utc, write_json
from bench.gpu_models import CPU_MODELS, MODELS, MOE_MODELS, active_weight_bytes, approx_params, write_model
from bench.gpu_profile import profile_decode, profile_table

@dataclass(slots=True)
class Plan:
    """Sizes of every phase; `--cpu` shrinks them all."""
    num_requests: int = 256
    min_len: int = 100
    max_len: int = 1024
    subset: int = 16
    subset_output: int = 128
    decode_batches: tuple[int, ...] = (1, 64, 256)
    decode_prompt: int = 512
    decode_steps: int = 64
    max_model_len: int = 2048
    bandwidth_bytes: int = 2 * 1024**3
    profile_batch: int = 64
    profile_steps: int = 8


CPU_PLAN = Plan(8, 16, 48, 4, 8, (1, 4), 32, 8, 256, 64 * 1024**2, 4, 3)
_OTHER_ENGINES_SHARE = 0.4  # of a model's time, for the engines before the last one (no nano workload)


def measure_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of a large device copy (read + write), the practical memory roofline."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        y.copy_(x)
    sync()
    iters = 20 if device == "cuda" else 5
    start = time.perf_counter()
    for _ in range(iters):
        y.copy_(x)
    sync()
    bandwidth = 2 * x.numel() * x.element_size() * iters / (time.perf_counter() - start)
    del x, y
    _release()
    return bandwidth


def _release() -> None:
    # The engine sizes its KV cache from free device memory: blocks cached by
    # torch's allocator for earlier phases must go back first.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def drive(engine, prompts: list[list[int]], params: list, deadline: float, tag: str) -> dict:
    """Run requests through `engine.step()`; abort what is left at the deadline.

    Returns elapsed time, output tokens and, for steps in which every request of
    the batch got a token (pure decode), the step time and context it read.
    """
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    produced = dict.fromkeys(ids, 0)
    decode_steps: list[tuple[float, int]] = []  # (seconds, context tokens read)
    start, complete = time.perf_counter(), True
    while engine.has_unfinished_requests():
        context = sum(len(p) + produced[r] for r, p in zip(ids, prompts))
        started = all(produced.values())
        t0 = time.perf_counter()
        outputs = engine.step()
        step_s = time.perf_counter() - t0
        for out in outputs:
            produced[out.request_id] = len(out.outputs[0].token_ids)
        if started and len(outputs) == len(ids):
            decode_steps.append((step_s, context))
        if time.perf_counter() > deadline:
            complete = False
            for rid in ids:
                engine.abort_request(rid)
            while engine.has_unfinished_requests():
                engine.step()
    return {"elapsed_s": time.perf_counter() - start, "output_tokens": sum(produced.values()),
            "complete": complete, "decode_steps": decode_steps}


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    subset: list[Request]
    rng: np.random.Generator
    vocab: int


def bench_engine(result: dict, folder: Path, graphs: str, last: bool, work: Workload, plan: Plan,
                 args: argparse.Namespace, device: str, bandwidth: float, deadline: float) -> None:
    """One engine with CUDA graphs `graphs` ("on"/"off"); the last one also runs the subset and nano phases."""
    from inference import LLM, SamplingParams

    t0 = time.perf_counter()
    engine_args = {"kv_cache_memory": 256 * 1024**2} if device == "cpu" else {}
    if args.dummy_weights:
        engine_args["load_format"] = "dummy"
    llm = LLM(model=str(folder), dtype=args.dtype, max_model_len=plan.max_model_len,
              max_num_seqs=max(plan.decode_batches + (plan.subset,)), enforce_eager=graphs == "off", **engine_args)
    result["load_s"][graphs] = time.perf_counter() - t0
    engine = llm.engine
    # The engine's start-up phases (weights, KV cache, autotune, graph capture) and the capture's memory.
    runner = engine.runner
    result["startup"][graphs] = {**engine.core.startup.seconds, "graph_capture_mib":
                                 runner.graphs.capture_bytes / 2**20 if runner.graphs is not None else 0.0,
                                 "num_graphs": len(runner.graphs.graphs) if runner.graphs is not None else 0}
    greedy = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)]
    drive(engine, [work.prompts[-1][::-1]], greedy, deadline, "warmup")
    if last and "hf_subset_tok_s" in result:
        run = drive(engine, [r.prompt_ids for r in work.subset],
                    [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in work.subset],
                    deadline, "subset")
        result["subset_tok_s"] = run["output_tokens"] / run["elapsed_s"]
        result["subset_ratio"] = result["subset_tok_s"] / result["hf_subset_tok_s"]

    for batch in plan.decode_batches:
        if time.perf_counter() > deadline:
            break
        batch_prompts = [work.rng.integers(0, work.vocab, size=plan.decode_prompt).tolist() for _ in range(batch)]
        params = [SamplingParams(temperature=0.0, max_tokens=plan.decode_steps, ignore_eos=True)] * batch
        steps = drive(engine, batch_prompts, params, deadline, f"decode{batch}-{graphs}")["decode_steps"]
        if not steps:
            continue
        step_s = float(np.median([s for s, _ in steps]))
        context = float(np.mean([c for _, c in steps]))
        ideal_s = (active_weight_bytes(result, batch) + context * result["kv_bytes_per_token"]) / bandwidth
        result["decode"].append({"graphs": graphs, "batch": batch, "step_ms": step_s * 1e3,
                                 "roofline_ms": ideal_s * 1e3, "efficiency": ideal_s / step_s, "tok_s": batch / step_s,
                                 "roofline_tok_s": batch / ideal_s, "avg_context": context / batch})
    if args.profile and time.perf_counter() < deadline:
        batch_prompts = [work.rng.integers(0, work.vocab, size=plan.decode_prompt).tolist()
                         for _ in range(plan.profile_batch)]
        result["profile"].append({"graphs": graphs, **profile_decode(engine, batch_prompts, plan.profile_steps,
                                                                     f"profile-{graphs}")})
    if last:
        params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for n in work.output_lens]
        run = drive(engine, work.prompts, params, deadline, "nano")
        result["nano"] = {"requests": plan.num_requests, "output_tokens": run["output_tokens"], "graphs": graphs,
                          "elapsed_s": run["elapsed_s"], "output_tok_s": run["output_tokens"] / run["elapsed_s"],
                          "complete": run["complete"]}


def bench_model(name: str, spec: dict, plan: Plan, args: argparse.Namespace, device: str, bandwidth: float,
                deadline: float) -> dict:
    from bench.throughput import run_transformers

    dtype = getattr(torch, args.dtype)
    result: dict = {"model": name, "load_s": {}, "startup": {}, "decode": [], "profile": []}
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work_dir))
    try:
        t0 = time.perf_counter()
        result.update(write_model(folder, spec, dtype, device, weights=not args.dummy_weights))
        result["write_s"] = time.perf_counter() - t0
        _release()
        rng = np.random.default_rng(0)
        vocab = min(10_000, spec["vocab_size"])  # nano-vllm draws prompt ids below 10000
        lens = rng.integers(plan.min_len, plan.max_len + 1, size=(plan.num_requests, 2))
        prompts = [rng.integers(0, vocab, size=n).tolist() for n in lens[:, 0]]
        subset = [Request(p[:plan.max_len], plan.subset_output) for p in prompts[:plan.subset]]
        work = Workload(prompts, [int(n) for n in lens[:, 1]], subset, rng, vocab)
        if not (args.no_transformers or args.dummy_weights):  # dummy: no weight files for transformers
            hf = run_transformers(subset, str(folder), args.dtype, plan.subset, use_tqdm=False)
            result["hf_subset_tok_s"] = hf.output_tok_s
            _release()

        modes = sorted(args.graphs, key=lambda mode: mode == "on")  # "on", the engine default, last
        start = time.perf_counter()
        for index, graphs in enumerate(modes):
            last = index == len(modes) - 1
            share = 1.0 if last else _OTHER_ENGINES_SHARE * (index + 1) / (len(modes) - 1)
            try:
                bench_engine(result, folder, graphs, last, work, plan, args, device, bandwidth,
                             start + (deadline - start) * share)
            except Exception as exc:  # noqa: BLE001 - the other mode's numbers still count
                result["error"] = f"graphs {graphs}: {type(exc).__name__}: {exc}"[:500]
            _release()
    except Exception as exc:  # noqa: BLE001 - one broken model must not lose the others' numbers
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        _release()
        shutil.rmtree(folder, ignore_errors=True)
    return result


def markdown(report: dict) -> str:
    lines = [f"# GPU engine benchmark, {report['date']}", "",
             f"{report['machine'].get('gpu', report['machine']['cpu'])}, torch {report['machine'].get('torch')}, "
             f"commit {report['commit']}, dtype {report['dtype']}, "
             f"measured copy bandwidth {report['bandwidth_gb_s']:.0f} GB/s", "",
             "| model | params | nano-vllm workload out tok/s (s) | subset: ours / transformers tok/s |"
             " decode: batch, step ms, roofline ms, efficiency |", "|---|---:|---:|---:|---|"]
    for r in report["models"]:
        if "error" in r and "nano" not in r:
            lines.append(f"| {r['model']} | – | error: {r['error'][:120]} | – | – |")
            continue
        nano = r.get("nano", {})
        nano_cell = (f"{nano['output_tok_s']:.0f} ({nano['elapsed_s']:.1f}"
                     f"{'' if nano['complete'] else ', cut at deadline'})") if nano else "skipped"
        subset = (f"{r['subset_tok_s']:.0f} / {r['hf_subset_tok_s']:.0f} = {r['subset_ratio']:.2f}x"
                  if "subset_ratio" in r else "–")
        decode = "; ".join(f"B={d['batch']} graphs {d['graphs']}: {d['step_ms']:.2f} / {d['roofline_ms']:.3f} "
                           f"({d['efficiency']:.1%})" for d in r.get("decode", []))
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.2f}M"
        lines.append(f"| {r['model']} | {params} | {nano_cell} | {subset} | {decode or '–'} |")
    lines += startup_table(report["models"])
    lines += profile_table(report["models"])
    skipped = report.get("skipped")
    if skipped:
        lines += ["", f"Skipped for the time budget: {', '.join(skipped)}"]
    return "\n".join(lines) + "\n"


def startup_table(models: list[dict]) -> list[str]:
    """Markdown lines: each engine's start-up, by phase, with the graphs' count and memory."""
    rows = [(r["model"], graphs, r["load_s"].get(graphs, 0.0), phases)
            for r in models for graphs, phases in r.get("startup", {}).items()]
    if not rows:
        return []
    lines = ["", "Engine start-up (`LLM(...)` to ready; weights written by the bench, read from a local disk):", "",
             "| model | graphs | total s | weights s | KV cache s | autotune s | graph capture s (graphs, MiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, graphs, total_s, p in rows:
        lines.append(f"| {model} | {graphs} | {total_s:.1f} | {p.get('weights', 0):.2f} | {p.get('kv_cache', 0):.2f} | "
                     f"{p.get('autotune', 0):.2f} | {p.get('graph_capture', 0):.2f} ({p['num_graphs']}, "
                     f"{p['graph_capture_mib']:.0f}) |")
    return lines


def _write(report: dict, out: Path, start: float) -> None:
    report["elapsed_s"] = time.perf_counter() - start
    write_json(out / "gpu_bench.json", report)
    (out / "gpu_bench.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="dry run: tiny shapes on the CPU")
    parser.add_argument("--models", default=None, help="comma-separated subset of the configs")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--budget-s", type=float, default=450.0, help="all models together")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or "bench/out/gpu")
    parser.add_argument("--work-dir", default=None, help="where the model folders go (deleted after)")
    parser.add_argument("--graphs", default="on", type=lambda v: v.split(","),
                        help="decode CUDA graphs: on (the engine default), off (enforce_eager), or on,off for both")
    parser.add_argument("--profile", action="store_true", help="profiler summary of decode steps at batch 64")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers subset comparison")
    parser.add_argument("--dummy-weights", action="store_true",
                        help="write no weights: the engine builds random ones on the device (load_format dummy)")
    args = parser.parse_args(argv)
    if not args.graphs or not set(args.graphs) <= {"on", "off"} or len(set(args.graphs)) < len(args.graphs):
        parser.error(f"--graphs takes on, off or on,off; got {','.join(args.graphs)}")
    start = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --cpu for a dry run")
    table, plan = (CPU_MODELS, CPU_PLAN) if args.cpu else ({**MODELS, **MOE_MODELS}, Plan())
    names = args.models.split(",") if args.models else list(CPU_MODELS if args.cpu else MODELS)
    bandwidth = measure_bandwidth(device, plan.bandwidth_bytes)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)
    report = {"date": now_utc(), "commit": git_commit(), "machine": machine_info(), "dtype": args.dtype,
              "plan": plan.__repr__(), "bandwidth_gb_s": bandwidth / 1e9, "models": [], "skipped": []}
    deadline = start + args.budget_s
    # Budget shares grow with model size (~sqrt of parameters); what a model
    # leaves unused goes to the next ones.
    weights = [approx_params(table[name]) ** 0.5 for name in names]
    for index, name in enumerate(names):
        left = deadline - time.perf_counter()
        if left < args.budget_s * 0.1:
            report["skipped"].append(name)
            continue
        share = weights[index] / sum(weights[index:])
        print(f"[gpu_bench] {name}: {left:.0f} s left, {share:.0%} of it for this model", flush=True)
        result = bench_model(name, table[name], plan, args, device, bandwidth, time.perf_counter() + left * share)
        print(json.dumps(result, default=float), flush=True)
        report["models"].append(result)
        _write(report, Path(args.out_dir), start)  # after each model: a hard stop keeps what is done
    _write(report, Path(args.out_dir), start)
    print(markdown(report))
    return 0 if report["models"] and not any("error" in r for r in report["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
