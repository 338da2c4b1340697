"""The engine-core process: a busy loop that never waits on HTTP.

    drain inputs     adds and aborts from the front end (ZeroMQ PULL); it
                     blocks only while there is no work; a KV snapshot
                     asked for is taken and sent here, between two steps,
                     and so is the answer to a LoRA adapter load or unload
    core.step()      one forward pass
    send outputs     ONE `StepOutputs` per step (ZeroMQ PUSH): every sample's
                     new token ids, finishes, logprobs, and the engine stats

The front end (`AsyncLLM`) binds both sockets and starts this process with
the multiprocessing spawn context. The process says `CoreReady` once the
model is loaded and the KV cache sized, or `CoreFailed` and exits. It ignores
SIGINT and SIGTERM (Ctrl+C or a service manager reach the whole process
group, and the front end must drain first; it sends `Shutdown` when done)
and exits by itself when its parent dies, so it is never left behind
holding the accelerator.

With tensor parallelism the core is rank 0 and starts the other ranks
(`inference/parallel/workers.py`); it stops them when it exits, and a rank
that dies ends this process at once, which the front end sees as a dead core.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from inference.core_codec import Codec
from inference.core_protocol import (
    CORE_INPUTS,
    CORE_OUTPUTS,
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreReady,
    LoadLoRAAdapter,
    ResetPrefixCache,
    Shutdown,
    SnapshotKV,
    StepOutputs,
    UnloadLoRAAdapter,
)

if TYPE_CHECKING:
    from inference.engine_core import EngineCore

logger = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0  # how often the core looks for its parent; bounds the orphan's lifetime
LINGER_MS = 2000  # how long a last message may wait to leave when the process exits
# oneDNN (bf16/fp16 matmuls on the CPU) caches a primitive per shape, in its own
# cache and in ideep's, 1024 entries each by default. A step's token count
# changes every step, so a serving core fills both (~0.3 MB an entry: ~650 MB
# even for a tiny model), then evicts and rebuilds entries for good, which
# fragments the heap: the core's RSS grew by ~50 KB a request in bench/soak.py
# (bench/RESULTS.md). With 256 entries it stays flat at the same request rate;
# a steady load's decode batch sizes move in a narrow range, so their shapes
# stay cached. Read once, at the first such matmul; an operator's value wins.
ONEDNN_CACHE_CAPACITY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256", "LRU_CACHE_CAPACITY": "256"}


def run_engine_core(core_factory: Callable[[], EngineCore], input_address: str, output_address: str,
                    parent_pid: int, spawned_at: float) -> None:
    """Entry point of the spawned process; `spawned_at` is the parent's time.time() at the spawn."""
    for name, value in ONEDNN_CACHE_CAPACITY.items():
        os.environ.setdefault(name, value)  # before the model's first matmul, and inherited by tensor-parallel ranks
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    context = zmq.Context()
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.LINGER, LINGER_MS)
    outputs.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader
    outputs.connect(output_address)
    codec = Codec(CORE_OUTPUTS)
    # The front end starts this process as a daemon, and the stdlib refuses
    # children to daemons; the tensor-parallel ranks this process starts are
    # its own to stop (and watch it themselves).
    multiprocessing.current_process().daemon = False
    from inference.parallel.workers import exit_on_rank_failure

    exit_on_rank_failure()
    core = None
    try:
        # The engine's imports (torch, transformers) timed on their own: with
        # the interpreter's start, the largest fixed cost of a start-up.
        importlib.import_module("inference.engine_core")
        spawn_imports_s = time.time() - spawned_at
        core = core_factory()
        # The factory's time that no phase of the core's own holds is the engine
        # config's (the flags checked, the model's config class imported: about
        # 0.7 s of transformers on the first AutoConfig), so every second counts somewhere.
        built_s = time.time() - spawned_at - spawn_imports_s
        core.startup.add("config", max(built_s - sum(core.startup.seconds.values()), 0.0))
        core.startup.add("core_spawn_imports", spawn_imports_s)
        ready = CoreReady(core.config, core.vocab_size, core.stats(), core.startup.seconds)
        outputs.send(codec.encode(ready))
        _CoreLoop(core, inputs, outputs, codec, parent_pid).run()
    except BaseException as exc:  # noqa: BLE001 - the front end must hear why
        logger.exception("engine core died")
        outputs.send(codec.encode(CoreFailed(repr(exc))))
        raise SystemExit(1) from exc
    finally:
        if core is not None:
            core.shutdown()
        inputs.close(linger=0)
        outputs.close()
        context.term()


class _CoreLoop:
    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket, codec: Codec,
                 parent_pid: int) -> None:
        self.core = core
        self.inputs = inputs
        self.outputs = outputs
        self.codec = codec
        self.input_codec = Codec(CORE_INPUTS)
        self.parent_pid = parent_pid
        self.next_parent_check = time.monotonic() + PARENT_CHECK_S
        self.num_adds = 0
        self.rejected: list[tuple[str, str]] = []

    def run(self) -> None:
        core = self.core
        while True:
            busy = core.has_unfinished_requests()
            applied = self._drain(block=not busy)
            if applied is None:
                return
            if core.has_unfinished_requests():
                step = self._step()
            elif applied:
                now = time.monotonic()  # nothing to run, but the front end must see the new stats
                step = StepOutputs([], now, now)
            else:
                continue
            step.stats = core.stats()
            step.num_adds, step.rejected = self.num_adds, self.rejected
            self.num_adds, self.rejected = 0, []
            self.outputs.send(self.codec.encode(step), copy=False)

    def _drain(self, *, block: bool) -> int | None:
        """Apply every waiting input; when `block`, first wait for one.
        Returns how many were applied, or None once told to shut down."""
        now = time.monotonic()
        if block or now >= self.next_parent_check:
            self.next_parent_check = now + PARENT_CHECK_S
            if os.getppid() != self.parent_pid:
                logger.error("the front end is gone; engine core exiting")
                return None
        if block and not self.inputs.poll(PARENT_CHECK_S * 1000):
            return 0
        applied = 0
        while True:
            try:
                message = self.input_codec.decode(self.inputs.recv(zmq.NOBLOCK, copy=False).buffer)
            except zmq.Again:
                return applied
            if isinstance(message, SnapshotKV):
                # Between steps, so never a half-updated state; it changes
                # nothing, so it is not counted as applied (no stats message).
                self.outputs.send(self.codec.encode(self.core.kv_snapshot()), copy=False)
                continue
            applied += 1
            if isinstance(message, Shutdown):
                return None
            if isinstance(message, AbortRequests):
                self.core.abort_requests(message.request_ids)
                continue
            if isinstance(message, ResetPrefixCache):
                self.core.reset_prefix_cache()
                continue
            if isinstance(message, (LoadLoRAAdapter, UnloadLoRAAdapter)):
                self.outputs.send(self.codec.encode(self.core.change_lora(message)), copy=False)
                continue
            self._add(message)

    def _add(self, add: AddRequest) -> None:
        self.num_adds += 1
        try:
            self.core.add_request(add)
        except Exception as exc:  # bad input fails this request only
            self.rejected.append((add.request_id, str(exc)))

    def _step(self) -> StepOutputs:
        # Imported here: the front end imports this module for the entry
        # point and must not pay for the model runner's imports.
        from inference.engine_core import StepError

        try:
            step = self.core.step()
        except StepError as exc:
            # Only the requests of the failed step are lost.
            logger.exception("engine step failed; failing %d requests", len(exc.request_ids))
            failed, failure = exc.request_ids, str(exc)
        except Exception as exc:
            # Failed outside the forward pass: which requests are hurt is
            # unknown, so every request is failed and aborted; if aborting
            # fails too, the core is broken and the process dies.
            failed = self.core.abort_all()
            logger.exception("engine step failed; failed %d requests", len(failed))
            failure = f"engine error: {exc!r}"
        else:
            return step
        now = time.monotonic()
        return StepOutputs([], now, now, failed=failed, failure=failure)
