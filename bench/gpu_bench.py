"""Offline engine on real model shapes with random weights, against the roofline.

For each model (configs inline, weights random: shapes are what speed depends
on), in this order and within one time budget:
  1. transformers `generate` on a 16-request subset, then our engine on the same
     subset (transformers first, so its memory is gone before our KV cache is sized);
  2. decode step time at batch 1/64/256 against the roofline
     batch x HBM bandwidth / (weight bytes + KV bytes read per step);
  3. the nano-vllm workload: 256 requests, input and output lengths uniform in
     100-1024, EOS ignored, temperature 0.6 (last: at the deadline it is cut
     short and reported as such, the other numbers are already in).
Run through bench/gpu.sh; `--cpu` runs the same code on tiny shapes here.
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

LLAMA3_ROPE = {"rope_type": "llama3", "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}
MODELS = {
    "Qwen3-0.6B": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, rope_scaling={**LLAMA3_ROPE, "factor": 32.0}),
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024)
CPU_MODELS = {"tiny-qwen3": dict(model_type="qwen3", tie_word_embeddings=True, **TINY),
              "tiny-llama": dict(model_type="llama", tie_word_embeddings=False, **TINY)}


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


CPU_PLAN = Plan(8, 16, 48, 4, 8, (1, 4), 32, 8, 256, 64 * 1024**2)


def write_model(folder: Path, spec: dict, dtype: torch.dtype, device: str) -> dict:
    """config.json, random safetensors shards and a word-level tokenizer; returns byte counts."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), eos_token_id=0, bos_token_id=None, **spec)
    with torch.device("meta"):  # names and shapes only, no init cost
        shapes = {k: (v.shape, v.dtype) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    config.architectures = [{"qwen3": "Qwen3ForCausalLM"}.get(config.model_type, "LlamaForCausalLM")]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    GenerationConfig(eos_token_id=0).save_pretrained(folder)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator(device=device).manual_seed(0)
    shard, shard_bytes, weight_map, total = {}, 0, {}, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(set(weight_map.values())):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for key, (shape, _) in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:  # std 0.02 keeps activations finite through every layer
            tensor = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
        shard[key] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if shard_bytes > 2 * 1024**3:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    vocab = {"<eos>": 0, **{f"t{i}": i for i in range(1, config.vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(folder)
    embed = shapes["model.embed_tokens.weight"][0].numel() * torch.finfo(dtype).bits // 8
    kv_heads, layers = config.num_key_value_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "weight_bytes": total,
        # Per decode step every matrix is read once; an untied embedding is only
        # gathered (a few rows), a tied one is read whole as the LM head.
        "weight_bytes_read": total - (0 if config.tie_word_embeddings else embed),
        "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8,
        "params": sum(s.numel() for s, _ in shapes.values()),
    }


def _approx_params(spec: dict) -> float:
    h, layers = spec["hidden_size"], spec["num_hidden_layers"]
    return layers * (4 * h * h + 3 * h * spec["intermediate_size"]) + spec["vocab_size"] * h


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


def bench_model(name: str, spec: dict, plan: Plan, args: argparse.Namespace, device: str, bandwidth: float,
                deadline: float) -> dict:
    from inference import LLM, SamplingParams

    from bench.throughput import run_transformers

    dtype = getattr(torch, args.dtype)
    result: dict = {"model": name}
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work_dir))
    try:
        t0 = time.perf_counter()
        result.update(write_model(folder, spec, dtype, device))
        result["write_s"] = time.perf_counter() - t0
        _release()
        rng = np.random.default_rng(0)
        vocab = min(10_000, spec["vocab_size"])  # nano-vllm draws prompt ids below 10000
        lens = rng.integers(plan.min_len, plan.max_len + 1, size=(plan.num_requests, 2))
        prompts = [rng.integers(0, vocab, size=n).tolist() for n in lens[:, 0]]
        subset = [Request(p[:plan.max_len], plan.subset_output) for p in prompts[:plan.subset]]
        hf = run_transformers(subset, str(folder), args.dtype, plan.subset, use_tqdm=False)
        result["hf_subset_tok_s"] = hf.output_tok_s

        t0 = time.perf_counter()
        engine_args = {"kv_cache_memory": 256 * 1024**2} if device == "cpu" else {}
        llm = LLM(model=str(folder), dtype=args.dtype, max_model_len=plan.max_model_len,
                  max_num_seqs=max(plan.decode_batches + (plan.subset,)), **engine_args)
        result["load_s"] = time.perf_counter() - t0
        engine = llm.engine
        greedy = [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)]
        drive(engine, [prompts[-1][::-1]], greedy, deadline, "warmup")
        run = drive(engine, [r.prompt_ids for r in subset],
                    [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in subset],
                    deadline, "subset")
        result["subset_tok_s"] = run["output_tokens"] / run["elapsed_s"]
        result["subset_ratio"] = result["subset_tok_s"] / result["hf_subset_tok_s"]

        result["decode"] = []
        for batch in plan.decode_batches:
            if time.perf_counter() > deadline:
                break
            batch_prompts = [rng.integers(0, vocab, size=plan.decode_prompt).tolist() for _ in range(batch)]
            params = [SamplingParams(temperature=0.0, max_tokens=plan.decode_steps, ignore_eos=True)] * batch
            steps = drive(engine, batch_prompts, params, deadline, f"decode{batch}")["decode_steps"]
            if not steps:
                continue
            step_s = float(np.median([s for s, _ in steps]))
            context = float(np.mean([c for _, c in steps]))
            ideal_s = (result["weight_bytes_read"] + context * result["kv_bytes_per_token"]) / bandwidth
            result["decode"].append({"batch": batch, "step_ms": step_s * 1e3, "roofline_ms": ideal_s * 1e3,
                                     "efficiency": ideal_s / step_s, "tok_s": batch / step_s,
                                     "roofline_tok_s": batch / ideal_s, "avg_context": context / batch})
        params = [SamplingParams(temperature=0.6, max_tokens=int(n), ignore_eos=True) for n in lens[:, 1]]
        run = drive(engine, prompts, params, deadline, "nano")
        result["nano"] = {"requests": plan.num_requests, "output_tokens": run["output_tokens"],
                          "elapsed_s": run["elapsed_s"], "output_tok_s": run["output_tokens"] / run["elapsed_s"],
                          "complete": run["complete"]}

        del llm, engine
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
        subset = f"{r['subset_tok_s']:.0f} / {r['hf_subset_tok_s']:.0f} = {r['subset_ratio']:.2f}x"
        decode = "; ".join(f"B={d['batch']}: {d['step_ms']:.2f} / {d['roofline_ms']:.3f} ({d['efficiency']:.1%})"
                           for d in r.get("decode", []))
        params = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.2f}M"
        lines.append(f"| {r['model']} | {params} | {nano_cell} | {subset} | {decode or '–'} |")
    skipped = report.get("skipped")
    if skipped:
        lines += ["", f"Skipped for the time budget: {', '.join(skipped)}"]
    return "\n".join(lines) + "\n"


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
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --cpu for a dry run")
    table, plan = (CPU_MODELS, CPU_PLAN) if args.cpu else (MODELS, Plan())
    names = args.models.split(",") if args.models else list(table)
    bandwidth = measure_bandwidth(device, plan.bandwidth_bytes)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)
    report = {"date": now_utc(), "commit": git_commit(), "machine": machine_info(), "dtype": args.dtype,
              "plan": plan.__repr__(), "bandwidth_gb_s": bandwidth / 1e9, "models": [], "skipped": []}
    deadline = start + args.budget_s
    # Budget shares grow with model size (~sqrt of parameters); what a model
    # leaves unused goes to the next ones.
    weights = [_approx_params(table[name]) ** 0.5 for name in names]
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
