"""What grammar-constrained decoding costs a server: the same requests at the
same concurrency, unconstrained and constrained by a JSON schema
(bench/serve.py --structured json), alternated over repeats on one server.

    python -m bench.structured                      # SmolLM2 on this machine, c=16
    python -m bench.structured --repeats 5 --output-len 128 --out bench/out/structured.json

Reports the median output tok/s of each and their ratio (target: structured
at least 0.9x of unconstrained at c=16).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from bench.common import add_workload_args, default_model, git_commit, load_tokenizer, machine_info, now_utc, \
    prompt_vocab_size, workload_from_args, write_json
from bench.serve import ClientConfig, level_requests, run_level


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the prepared SmolLM2)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-args", default="--max-model-len 1024", help="extra `pagedinfer serve` flags")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    add_workload_args(parser)
    parser.set_defaults(input_len=128, output_len=128)
    args = parser.parse_args(argv)

    from bench.peers.servers import ServerProcess, free_port

    model = args.model or default_model()
    tokenizer = load_tokenizer(model)
    vocab_size = prompt_vocab_size(model, tokenizer)
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port), *args.server_args.split()]
    free = ClientConfig(base_url=f"http://127.0.0.1:{port}", model=Path(model).name, temperature=1.0)
    kinds = {"none": free, "json": replace(free, structured="json")}
    throughput: dict[str, list[float]] = {kind: [] for kind in kinds}
    with ServerProcess(command, free.base_url + "/ready", Path("bench/out/structured-server.log"), startup_timeout=600):
        for repeat in range(args.repeats):
            for kind, cfg in kinds.items():
                workload = workload_from_args(args, args.num_prompts)
                # A new seed per run: the same prompts again would hit the prefix cache.
                reqs = level_requests(workload, 2 * repeat + (kind == "json"), args.concurrency, tokenizer, vocab_size)
                metrics = run_level(cfg, reqs, args.concurrency, label=f"{kind} c={args.concurrency}")["metrics"]
                if metrics["failed"] or metrics["short_outputs"]:
                    print(f"{kind}: {metrics['failed']} failed, {metrics['short_outputs']} short: {metrics['errors']}")
                throughput[kind].append(metrics["output_throughput"])
                print(f"repeat {repeat} {kind:>4}: output {metrics['output_throughput']:.1f} tok/s")
    medians = {kind: statistics.median(values) for kind, values in throughput.items()}
    ratio = medians["json"] / medians["none"]
    print(f"median output tok/s: unconstrained {medians['none']:.1f}, json {medians['json']:.1f}, ratio {ratio:.3f}")
    if args.out:
        write_json(args.out, {
            "date": now_utc(), "commit": git_commit(), "machine": machine_info(),
            "command": " ".join(["python -m bench.structured", *sys.argv[1:]]),
            "concurrency": args.concurrency, "output_tok_s": throughput, "median_output_tok_s": medians,
            "ratio": ratio,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
