"""Multi-LoRA on the CPU: the same requests on the base model alone and
spread over 1, 4 and 16 adapters, and the cost of a decode step.

Adapters are written by peft (`pip install peft`, the dev extra) into a
temporary folder: rank `--rank` on all seven projections, random non-zero
weights. Requests go round-robin over the adapters; with more adapters than
`--max-loras` device slots they swap in and out (from host memory, up to
16 there, so nothing is re-read from disk).

    python -m bench.lora --out bench/out/lora.json

Prints generated tokens per second per configuration, and the median
milliseconds of a decode step at `--batch` requests on the base model and
with `--step-adapters` adapters, stepped in turn (the overhead the issue
bounds at 1.3x). `--adapters ""` runs the step timing alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Workload, build_requests, default_model, git_commit, machine_info, now_utc, write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapters(model: str, folder: Path, count: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        torch.manual_seed(i)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False)
        path = folder / f"adapter{i}"
        get_peft_model(base, config).save_pretrained(path)
        paths.append(path)
    return paths


def _llm(args: argparse.Namespace, num_adapters: int):
    from inference import LLM

    lora = dict(enable_lora=True, max_loras=min(num_adapters, args.max_loras), max_lora_rank=args.rank,
                max_cpu_loras=max(num_adapters, args.max_loras)) if num_adapters else {}
    return LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.batch, kv_cache_memory=args.kv_cache_memory,
               **lora)


def _lora_requests(paths: list[Path], num_adapters: int, count: int):
    from inference.lora.config import LoRARequest

    if not num_adapters:
        return None
    return [LoRARequest(f"adapter{i % num_adapters}", i % num_adapters + 1, str(paths[i % num_adapters]))
            for i in range(count)]


def throughput(args: argparse.Namespace, paths: list[Path], num_adapters: int) -> dict:
    from inference import SamplingParams

    llm = _llm(args, num_adapters)
    workload = Workload(dataset="sharegpt", num_prompts=args.num_prompts, max_input_len=args.max_input_len, seed=0)
    prompts = [r.prompt_ids for r in build_requests(workload, llm.engine.core.vocab_size)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    lora = _lora_requests(paths, num_adapters, len(prompts))
    llm.generate(prompts[:2], params, use_tqdm=False, lora_request=lora[:2] if lora else None)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    residency = llm.engine.runner.lora
    return {"adapters": num_adapters, "seconds": elapsed, "generated_tokens": generated,
            "tokens_per_s": generated / elapsed, "swaps_in": residency.num_swaps_in if residency else 0}


def _decoding_engine(args: argparse.Namespace, paths: list[Path], num_adapters: int):
    """An engine whose `--batch` requests (spread over `num_adapters`) have all finished their prompts."""
    from inference import SamplingParams

    engine = _llm(args, num_adapters).engine
    lora = _lora_requests(paths, num_adapters, args.batch)
    if lora:
        for request in {r.lora_name: r for r in lora}.values():
            engine.add_lora(request.lora_name, request.lora_path)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 16, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), list(range(10 + i, 60 + i)), params, lora_name=lora[i].lora_name if lora else None)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    return engine


def step_ms(args: argparse.Namespace, paths: list[Path]) -> tuple[float, float, float]:
    """Median ms of a decode step at `--batch` on the base model and with `--step-adapters` adapters,
    and the median of the per-pair ratios. The two engines step in turn, so load that comes and goes
    on a shared machine hits both alike."""
    base, lora = _decoding_engine(args, paths, 0), _decoding_engine(args, paths, args.step_adapters)
    base_s, lora_s = [], []
    for _ in range(args.steps):
        for engine, times in ((base, base_s), (lora, lora_s)):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    ratio = statistics.median(b / a for a, b in zip(base_s, lora_s))
    return statistics.median(base_s) * 1e3, statistics.median(lora_s) * 1e3, ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the prepared SmolLM2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--adapters", default="0,1,4,16", help="comma-separated adapter counts (0: base alone)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=4, help="device slots")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-input-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="max_num_seqs, and the decode batch of the step timing")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps")
    parser.add_argument("--step-adapters", type=int, default=4)
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes (default: the CPU's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.model = args.model or default_model()
    counts = [int(n) for n in args.adapters.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="pagedinfer-lora-") as folder:
        paths = write_adapters(args.model, Path(folder), max(counts + [args.step_adapters]), args.rank)
        runs = [throughput(args, paths, n) for n in counts]
        base_ms, lora_ms, ratio = step_ms(args, paths)
    print("| adapters | tok/s | s | adapter swaps |\n|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['adapters'] or 'base'} | {r['tokens_per_s']:.1f} | {r['seconds']:.2f} | {r['swaps_in']} |")
    print(f"decode step at batch {args.batch}: base {base_ms:.1f} ms, {args.step_adapters} adapters {lora_ms:.1f} ms "
          f"(median of paired ratios {ratio:.2f}x)")
    if args.out:
        write_json(args.out, {
            "date": now_utc(), "commit": git_commit(), "machine": machine_info(), "model": args.model,
            "dtype": args.dtype, "rank": args.rank, "max_loras": args.max_loras, "throughput": runs,
            "step": {"batch": args.batch, "base_ms": base_ms, "adapters": args.step_adapters, "lora_ms": lora_ms,
                     "paired_ratio": ratio},
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
