"""What a prefix-cache block hash costs, per block, for each algorithm.

Hashes the chain of full blocks of a random prompt, as the scheduler does on
admission, with `BlockHasher` itself (so the numbers are the engine's), salted
and not; reports the best of --repeats runs in microseconds per block and the
ratio to `sha256`, pagedinfer's earlier hash.

    python -m bench.block_hash --num-blocks 4096 --block-size 16
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `inference.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.block_hashing import HASH_ALGOS, BlockHasher


def us_per_block(hasher: BlockHasher, token_ids: list[int], block_size: int, salt: str | None, repeats: int) -> float:
    num_blocks = len(token_ids) // block_size
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        hasher.hash_blocks(token_ids, block_size, salt)
        best = min(best, time.perf_counter() - start)
    return best / num_blocks * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    token_ids = [rng.randrange(150_000) for _ in range(args.num_blocks * args.block_size)]
    print(f"{args.num_blocks} blocks of {args.block_size} tokens, best of {args.repeats}")
    costs = {}
    for algo in HASH_ALGOS:
        hasher = BlockHasher.create(algo)
        for salt in (None, "tenant-a"):
            costs[algo, salt] = us_per_block(hasher, token_ids, args.block_size, salt, args.repeats)
    for (algo, salt), cost in costs.items():
        ratio = cost / costs["sha256", salt]
        print(f"{algo:12s} {'salted' if salt else 'unsalted':9s} {cost:7.2f} us/block  {ratio:5.2f}x sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
