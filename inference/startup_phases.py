"""Seconds spent in each start-up phase, for the start-up log line and metrics.

Start-up time is the autoscaler's reaction time: a replica added for a burst
serves nothing until it is ready. Each side times its own phases (the front
end its imports and tokenizer; the engine core its imports, config,
tokenizer, weights, KV cache and warm-up; on a GPU autotuning and graph
capture) and the core's reach the front end in CoreReady, as a flat dict.

Invariants: phase names are stable metric label values; a phase timed twice
(one per tensor-parallel rank, say) adds up; nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# The order of the log line; phases a start-up did not run are left out.
PHASES = ("frontend_imports", "core_spawn_imports", "config", "tokenizer", "cpu_kernels", "weights",
          "kv_cache", "warmup", "cpu_threads", "autotune", "graph_capture", "frontend_tokenizer")


@dataclass(slots=True)
class StartupPhases:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        assert name in PHASES, name
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def describe(self, total_s: float, weight_bytes: int = 0) -> str:
        """One line: every phase's seconds in order, the weights' GB/s, and the total."""
        parts = []
        for name in PHASES:
            if name in self.seconds:
                part = f"{name} {self.seconds[name]:.2f} s"
                if name == "weights" and weight_bytes and self.seconds[name] > 0:
                    part += f" ({weight_bytes / self.seconds[name] / 1e9:.2f} GB/s)"
                parts.append(part)
        return f"start-up {total_s:.2f} s: " + ", ".join(parts)


def process_started_at() -> float:
    """This process's start as a time.time() value: the interpreter's own start-up counts too."""
    try:
        with open("/proc/self/stat") as stat:
            # Field 22, after the parenthesised command name: clock ticks since boot.
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as stat:
            boot = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()  # not Linux: from here on
    return boot + ticks / os.sysconf("SC_CLK_TCK")
