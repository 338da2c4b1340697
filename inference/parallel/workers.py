"""Rank 0's side of tensor parallelism: start ranks 1..N-1, send them each
step, and notice when one dies.

Each rank is a process of its own (multiprocessing spawn: the parent may
hold threads and a CUDA context). Steps go out over one pipe per rank: the
pipe was the cheapest of pipe, shared memory and a torch.distributed
broadcast at batch 16 (bench/tp_overhead.py, bench/RESULTS.md), and a rank
waiting on a pipe can sit idle for hours, where a collective would time out.

A thread here waits on the ranks' process sentinels. When one exits it
records why (the rank's own error message when it sent one), kills the other
ranks so no collective waits for them, and, in the engine-core process
(`exit_on_rank_failure`), ends the process: the front end sees the core die
within a second and fails the open requests. The offline engine instead
raises from its next step.

Invariants:
- The ranks never outlive rank 0: they poll their parent and exit when it
  is gone, and `stop` (or the watcher) ends them.
- A failure names the rank and its error.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from multiprocessing.connection import Connection, wait

import torch

from inference.config import EngineConfig
from inference.parallel import group
from inference.parallel.worker_main import run_worker

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # how long a rank may take to stop before it is killed
FAILURE_REPORT_S = 2.0  # how long a failed start-up waits to hear which rank died and why
_WATCH_POLL_S = 0.5  # how often the watcher looks whether it should stop watching

_exit_on_rank_failure = False


def exit_on_rank_failure() -> None:
    """Make a dead rank end this process (the engine-core process calls it)."""
    global _exit_on_rank_failure
    _exit_on_rank_failure = True


class TensorParallelWorkers:
    def __init__(self, config: EngineConfig) -> None:
        """Start ranks 1..N-1 and join the group as rank 0 (returns once all have joined)."""
        size = config.tensor_parallel_size
        context = multiprocessing.get_context("spawn")
        self._dir = tempfile.mkdtemp(prefix="pagedinfer-tp-")
        init_file = os.path.join(self._dir, "rendezvous")
        self.failure: str | None = None
        self._failed = threading.Event()
        self._stopping = False
        self._steps: list[Connection] = []
        self._errors: list[Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for rank in range(1, size):
            step_reader, step_writer = context.Pipe(duplex=False)
            error_reader, error_writer = context.Pipe(duplex=False)
            process = context.Process(
                target=run_worker,
                args=(config, rank, init_file, step_reader, error_writer, os.getpid(), torch.get_num_threads()),
                name=f"tp-rank-{rank}", daemon=True,
            )
            process.start()
            step_reader.close()
            error_writer.close()
            self._steps.append(step_writer)
            self._errors.append(error_reader)
            self.processes.append(process)
        self._watcher = threading.Thread(target=self._watch, name="tp-rank-watcher", daemon=True)
        self._watcher.start()
        # Before multiprocessing's own exit hook, which would SIGTERM the
        # ranks (they ignore it) and then wait for them forever.
        atexit.register(self.stop)
        try:
            group.init_group(0, size, init_file, config.device)
        except Exception as exc:
            failure = self.wait_failure(FAILURE_REPORT_S)
            self.stop()
            raise RuntimeError(failure or f"tensor-parallel start-up failed: {exc!r}") from exc

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def wait_failure(self, timeout: float) -> str | None:
        """Why a rank died, waiting up to `timeout` for the watcher to tell:
        a collective can fail a moment before the watcher sees the exit."""
        self._failed.wait(timeout)
        return self.failure

    def send(self, message: bytes) -> None:
        """Hand one step to every other rank."""
        try:
            for conn in self._steps:
                conn.send_bytes(message)
        except OSError as exc:  # a closed pipe: that rank is gone
            raise RuntimeError(self.failure or f"a tensor-parallel rank is gone ({exc!r})") from exc
        if self.failure is not None:
            raise RuntimeError(self.failure)

    def stop(self) -> None:
        """End every rank (an empty message asks; a kill follows after STOP_TIMEOUT_S) and leave the group."""
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self.stop)
        for conn in self._steps:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass  # already gone
        for process in self.processes:
            process.join(STOP_TIMEOUT_S)
            if process.is_alive():
                logger.error("tensor-parallel %s did not stop; killing it", process.name)
                process.kill()
                process.join()
        for conn in self._steps + self._errors:
            conn.close()
        group.destroy_group()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes, start=1)}
        while not self._stopping:
            ready = wait(list(sentinels), timeout=_WATCH_POLL_S)
            if not ready or self._stopping:
                continue
            rank = sentinels[ready[0]]
            process, errors = self.processes[rank - 1], self._errors[rank - 1]
            process.join()
            try:
                error = errors.recv()
            except (EOFError, OSError):  # killed before it could say anything
                error = "no error reported"
            self.failure = f"tensor-parallel rank {rank} exited with code {process.exitcode}: {error}"
            logger.error("%s", self.failure)
            self._failed.set()
            for other in self.processes:
                if other.is_alive():
                    other.kill()
            if _exit_on_rank_failure:
                os._exit(1)
            return
