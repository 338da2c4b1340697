"""Offline throughput, like `vllm bench throughput`.

Every backend gets the same seeded prompts (token ids) and the same output
lengths, with EOS ignored, so the token counts are identical and only the time
differs. Example, the engine issue's acceptance run:

    python -m bench.throughput --input-len 288 --range-ratio 0.7775 --output-len 128 \
        --output-range-ratio 0 --num-prompts 64 --backends pagedinfer,transformers --dtype float32,bfloat16

(input lengths floor/ceil of 288 * (1 -+ 0.7775): uniform in 64-512 tokens).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    Request, add_workload_args, build_requests, default_model, git_commit, machine_info,
    now_utc, prompt_vocab_size, workload_from_args, write_json,
)

BACKENDS = ("pagedinfer", "transformers")


@dataclass(slots=True)
class BackendResult:
    backend: str
    dtype: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "requests_per_s": self.num_requests / self.elapsed_s,
            "total_tok_per_s": (self.prompt_tokens + self.output_tokens) / self.elapsed_s,
            "output_tok_per_s": self.output_tok_s,
        }


def _release_memory() -> None:
    # Backends run one after another in one process; the previous one's
    # weights and KV cache must be gone before the next one allocates.
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_pagedinfer(
    requests: list[Request],
    model: str,
    dtype: str,
    engine_args: dict | None = None,
    temperature: float = 0.0,
    warmup: bool = True,
    use_tqdm: bool = True,
) -> BackendResult:
    from inference import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, **(engine_args or {}))
    if warmup:
        # Reversed, so the warm-up prompt shares no prefix-cache block with request 0.
        llm.generate([requests[0].prompt_ids[:32][::-1]], SamplingParams(temperature=0.0, max_tokens=4),
                     use_tqdm=False)
    params = [SamplingParams(temperature=temperature, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_ids for r in requests], params, use_tqdm=use_tqdm)
    elapsed = time.perf_counter() - start
    result = BackendResult(
        "pagedinfer", dtype, elapsed, len(outputs),
        sum(len(o.prompt_token_ids) for o in outputs),
        sum(len(o.outputs[0].token_ids) for o in outputs),
    )
    llm.shutdown()
    del llm, outputs
    _release_memory()
    return result


def run_transformers(
    requests: list[Request],
    model: str,
    dtype: str,
    batch_size: int,
    warmup: bool = True,
    use_tqdm: bool = True,
) -> BackendResult:
    """Static batches through `model.generate`: left padding, greedy, EOS held off."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(device).eval()
    pad_id = hf.generation_config.pad_token_id
    pad_id = 0 if pad_id is None else pad_id  # masked out; any id works

    def generate(batch: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        new = max(r.output_len for r in batch)
        # min_new_tokens == max_new_tokens is how generate() ignores EOS.
        hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                    min_new_tokens=new, do_sample=False, pad_token_id=pad_id)

    # Like lengths in a batch, so static batching wastes as little as it can:
    # the floor should be what a careful transformers user gets.
    ordered = sorted(requests, key=lambda r: (r.output_len, len(r.prompt_ids)))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    with torch.inference_mode():
        if warmup:
            generate([Request(requests[0].prompt_ids[:32], 4)])
        start = time.perf_counter()
        for batch in tqdm(batches, desc="transformers", disable=not use_tqdm):
            generate(batch)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    # Tokens a shorter request generates past its own output_len are waste, not output.
    result = BackendResult("transformers", dtype, elapsed, len(requests),
                           sum(len(r.prompt_ids) for r in requests), sum(r.output_len for r in requests))
    hf = None  # drop the weights (also held by generate's closure) before the next backend
    _release_memory()
    return result


def engine_args_from(args: argparse.Namespace) -> dict:
    names = ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory", "block_size", "max_model_len",
             "tensor_parallel_size")
    engine_args = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if not args.prefix_caching:
        engine_args["enable_prefix_caching"] = False
    return engine_args


def run(args: argparse.Namespace) -> dict:
    backends = args.backends.split(",")
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise SystemExit(f"unknown backend(s) {sorted(unknown)}; choose from {BACKENDS}")
    model = args.model or default_model()
    workload = workload_from_args(args)
    requests = build_requests(workload, prompt_vocab_size(model))
    results: dict[str, dict] = {}
    ratios: dict[str, float] = {}
    for dtype in args.dtype.split(","):
        by_backend: dict[str, BackendResult] = {}
        for backend in backends:
            if backend == "pagedinfer":
                result = run_pagedinfer(requests, model, dtype, engine_args_from(args), warmup=args.warmup,
                                        use_tqdm=args.tqdm)
            else:
                result = run_transformers(requests, model, dtype, args.hf_batch_size, warmup=args.warmup,
                                          use_tqdm=args.tqdm)
            by_backend[backend] = result
            results[f"{backend}/{dtype}"] = result.to_dict()
        if len(by_backend) == 2:
            ratios[dtype] = by_backend["pagedinfer"].output_tok_s / by_backend["transformers"].output_tok_s
    return {
        "date": now_utc(), "commit": git_commit(), "machine": machine_info(), "model": model,
        "command": " ".join(["python -m bench.throughput", *sys.argv[1:]]),
        "workload": asdict(workload),
        "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
        "results": results,
        "ratio_output_tok_s": ratios,  # pagedinfer / transformers, per dtype
    }


def print_report(report: dict) -> None:
    print(f"\n{'backend/dtype':<26}{'req/s':>9}{'total tok/s':>13}{'output tok/s':>14}{'time s':>9}")
    for name, r in report["results"].items():
        print(f"{name:<26}{r['requests_per_s']:>9.2f}{r['total_tok_per_s']:>13.1f}"
              f"{r['output_tok_per_s']:>14.1f}{r['elapsed_s']:>9.2f}")
    for dtype, ratio in report["ratio_output_tok_s"].items():
        print(f"pagedinfer / transformers output tok/s ({dtype}): {ratio:.2f}x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the prepared SmolLM2)")
    add_workload_args(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--backends", "--backend", dest="backends", default="pagedinfer",
                        help=f"comma-separated, from {','.join(BACKENDS)}")
    parser.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--hf-batch-size", type=int, default=16, help="transformers static batch size")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache bytes")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=None)
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one short untimed request per backend first")
    parser.add_argument("--tqdm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    print_report(report)
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
