"""The engine's start-up path on a model with fewer positions than a step's token budget.

A GPU start profiles the largest step (`max_num_batched_tokens`, 8192 by
default) to size the KV cache and autotunes the prefill kernel in every
length bucket. With 2048 positions, one request of 8192 tokens would read
the rotary table past its end; the runner splits the profile into requests
of at most `max_model_len`. `bench/gpu_check.sh --serve` runs this under
compute-sanitizer's memcheck where the GPU image has it, so an out-of-bounds
read fails the step:

    python -m bench.gpu_startup --device cuda
    compute-sanitizer --tool memcheck --error-exitcode 3 python -m bench.gpu_startup --device cuda
    python -m bench.gpu_startup --device cpu     # the same calls on the CPU (a dry run)

Prints the start-up time, the KV block count, the prefill configs tuned
(CUDA) and the generated token ids; exits non-zero on any error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Llama-like, 2048 positions, head_dim 64 and GQA 2: small, so memcheck's slowdown stays bounded.
SPEC = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=2048,
            tie_word_embeddings=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)

    import torch

    from bench.gpu_models import write_model
    from inference import LLM, SamplingParams

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="pagedinfer-startup-") as folder:
        write_model(Path(folder), SPEC, dtype, args.device)
        start = time.perf_counter()
        # The GPU default budget (8192 tokens a step) on the CPU too, where the KV cache is given.
        cpu = {} if args.device == "cuda" else dict(kv_cache_memory=256 * 2**20)
        llm = LLM(model=folder, device=args.device, dtype=str(dtype).removeprefix("torch."),
                  max_num_batched_tokens=8192, **cpu)
        ready_s = time.perf_counter() - start
        runner = llm.engine.runner
        logits = runner.profile_forward()  # what a GPU start ran to size the KV cache; the CPU runs it here
        assert torch.isfinite(logits).all(), "non-finite logits from the start-up profile"
        prompt = [1 + (7 * i) % 500 for i in range(1500)]  # a prefill in the top length bucket
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        print(f"ready in {ready_s:.1f} s, {runner.num_blocks} KV blocks, max_model_len "
              f"{llm.engine.config.max_model_len}, generated {out[0].outputs[0].token_ids}")
        if args.device == "cuda":
            from kernels.prefill_attention import tuned_configs

            torch.cuda.synchronize()
            for key, config in tuned_configs().items():
                print(f"tuned {key[:3]}: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
