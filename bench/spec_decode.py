"""Speculative decoding on and off, offline, on the same greedy requests.

Two workloads: `copy` (chat prompts asking to repeat or lightly edit a text
they quote, where n-gram lookup finds the continuation in the prompt) and
`free` (open-ended questions, where it rarely does). Each runs at
concurrency 1 (requests one after another) and 16 (all queued at once,
`max_num_seqs` 16), with speculation off and on; greedy outputs must be the
same tokens both ways, so the token counts match and only time differs.

    python -m bench.spec_decode --dtype float32 --out bench/out/spec_decode.json
    python -m bench.spec_decode --speculative-config '{"method": "suffix", "num_speculative_tokens": 8}'

With `suffix` the "on" engine keeps its cache of recent answers across the
rows (as a server would): a later row's requests draft from an earlier
row's answers to the same prompts, so compare its first row with n-gram's.

Prints per workload and concurrency the output tokens per second off and
on, their ratio, the acceptance rate (accepted / drafted tokens) and the
mean accepted length (1 + accepted tokens per draft: tokens a verifying
step emits), and whether the outputs matched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import default_model, git_commit, machine_info, now_utc, write_json

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
TEXTS = [
    "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
    "    return total / len(values)\n",
    "The meeting is moved to Thursday at 10am in room 4B. Please bring the quarterly numbers and the draft "
    "budget, and send your slides to Maria by Wednesday noon.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        "
    "self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n",
    "Preheat the oven to 180 degrees. Mix the flour, sugar and butter, add two eggs, pour the batter into "
    "a greased tin and bake for 35 minutes until golden.",
]
COPY_ASKS = ["Repeat the following text exactly:", "Rewrite this with the same wording, fixing nothing:",
             "Copy this verbatim:", "Write this out again, word for word:"]
FREE_ASKS = ["Write a short story about a lighthouse keeper.", "Explain why the sky is blue.",
             "Give me three ideas for a weekend trip.", "What makes a good friend?",
             "Describe your ideal breakfast.", "How do plants grow?", "Write a poem about rain.",
             "What is the best way to learn a language?"]


def prompts(tokenizer, workload: str, count: int) -> list[list[int]]:
    asks = ([f"{COPY_ASKS[i % len(COPY_ASKS)]}\n\n{TEXTS[i % len(TEXTS)]}" for i in range(count)]
            if workload == "copy" else [FREE_ASKS[i % len(FREE_ASKS)] for i in range(count)])
    if tokenizer.chat_template is None:
        return [tokenizer.encode(ask) for ask in asks]
    return [tokenizer.apply_chat_template([{"role": "user", "content": ask}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for ask in asks]


def run(llm, batch: list[list[int]], concurrency: int, params) -> tuple[float, list[list[int]]]:
    """Seconds and output token ids, `concurrency` requests at a time."""
    start = time.perf_counter()
    outputs = []
    for first in range(0, len(batch), concurrency):
        outputs += llm.generate(batch[first : first + concurrency], params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outputs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the prepared SmolLM2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated")
    parser.add_argument("--workloads", default="copy,free", help="comma-separated: copy, free")
    parser.add_argument("--speculative-config", default=json.dumps(DEFAULT_SPEC), metavar="JSON")
    parser.add_argument("--kv-cache-memory", type=int, default=1 << 30)
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)

    from inference import LLM, SamplingParams

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    model = args.model or default_model()
    common = dict(model=model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                  max_num_seqs=max(concurrencies))
    engines = {"off": LLM(**common), "on": LLM(**common, speculative_config=json.loads(args.speculative_config))}
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len)
    rows = []
    for workload in args.workloads.split(","):
        batch = prompts(engines["on"].tokenizer, workload, args.num_prompts)
        for concurrency in concurrencies:
            row = {"workload": workload, "concurrency": concurrency}
            outputs = {}
            for mode, llm in engines.items():
                llm.generate(batch[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm up
                before = llm.stats().spec_decode
                seconds, outputs[mode] = run(llm, batch, concurrency, params)
                num_tokens = sum(map(len, outputs[mode]))
                row[f"{mode}_output_tok_s"] = num_tokens / seconds
                row["output_tokens"] = num_tokens
                if before is not None:
                    after = llm.stats().spec_decode
                    drafts = after.num_drafts - before.num_drafts
                    drafted = after.num_draft_tokens - before.num_draft_tokens
                    accepted = after.num_accepted_tokens - before.num_accepted_tokens
                    row["acceptance_rate"] = accepted / drafted if drafted else 0.0
                    row["mean_accepted_length"] = 1 + accepted / drafts if drafts else 1.0
            row["speedup"] = row["on_output_tok_s"] / row["off_output_tok_s"]
            row["identical_outputs"] = outputs["on"] == outputs["off"]
            rows.append(row)
            print(f"{workload:5s} c={concurrency:<3d} off {row['off_output_tok_s']:8.1f} tok/s  "
                  f"on {row['on_output_tok_s']:8.1f} tok/s  x{row['speedup']:.2f}  "
                  f"acceptance {row['acceptance_rate']:.2f}  mean accepted length "
                  f"{row['mean_accepted_length']:.2f}  identical {row['identical_outputs']}")
    if args.out:
        write_json(args.out, {
            "when": now_utc(), "commit": git_commit(), "machine": machine_info(), "model": model,
            "dtype": args.dtype, "num_prompts": args.num_prompts, "output_len": args.output_len,
            "speculative_config": json.loads(args.speculative_config), "results": rows,
        })
    return 0 if all(r["identical_outputs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
