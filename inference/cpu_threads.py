"""How many torch threads a CPU engine core runs with, when it serves.

`serve` runs the front end (HTTP, tokenizer, detokenizer, streams) and the
engine core as two processes on the same cores. With torch's default, one
thread a core, every decode step's OpenMP team also needs the core the front
end is busy on, and each step waits for its slowest thread: on 2 cores a tiny
model served at 0.21x its offline speed with 2 threads and 0.60x with 1. A
model big enough to use every core still gains from the last one. So the core
times a decode-shaped forward with all cores and with one fewer, and keeps
the last core only when it buys at least `MIN_SPEEDUP`.

Invariants: the choice is one of the counts measured; a count given by the
operator (`--engine-threads`) is used as it is, unmeasured; nothing here runs
on a GPU or under tensor parallelism (its ranks take rank 0's count at spawn).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# The speedup the last core must give the engine to be taken from the front end.
MIN_SPEEDUP = 1.25
REPEATS = 2


def candidate_counts(num_cores: int) -> list[int]:
    """All cores, and one fewer where there is more than one."""
    return [num_cores, num_cores - 1] if num_cores > 1 else [num_cores]


def pick_num_threads(step_seconds: dict[int, float]) -> int:
    """The fewest threads within MIN_SPEEDUP of the most: the most threads
    only where they are at least that much faster."""
    most = max(step_seconds)
    fewer = [count for count in step_seconds if step_seconds[count] <= step_seconds[most] * MIN_SPEEDUP]
    return min(fewer)


def measure_step_seconds(forward: Callable[[], object], counts: list[int]) -> dict[int, float]:
    """Best seconds of `forward` at each thread count (each count warmed once
    first): the best, as a moment's interference only ever adds time."""
    seconds = {}
    with torch.inference_mode():
        for count in counts:
            torch.set_num_threads(count)
            forward()  # OpenMP builds its team for this count
            runs = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                forward()
                runs.append(time.perf_counter() - start)
            seconds[count] = min(runs)
    return seconds


def choose_num_threads(forward: Callable[[], object], num_cores: int) -> tuple[int, dict[int, float]]:
    """Measure, pick, and set the engine's thread count: (count, seconds per count)."""
    seconds = measure_step_seconds(forward, candidate_counts(num_cores))
    count = pick_num_threads(seconds)
    torch.set_num_threads(count)
    logger.info("engine threads: %d of %d cores (a decode step of 16: %s; the last core is kept only if "
                "%.2fx faster)", count, num_cores,
                ", ".join(f"{n} threads {s * 1e3:.1f} ms" for n, s in seconds.items()), MIN_SPEEDUP)
    return count, seconds
