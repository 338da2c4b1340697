"""Asyncio front end of the engine core, which runs in its own process.

The core process (`inference/core_process.py`) steps the model in a busy
loop; this side owns the tokenizer, the output processor (text, stop
strings, logprobs) and the per-request streams. They talk over two ZeroMQ
IPC sockets with msgpack structs: adds and aborts go out as they happen, and
one `StepOutputs` per step comes back. A single task on the event loop reads
those and dispatches them to the open streams, so nothing here is shared
between threads and the model never waits for the HTTP server.

The core is watched through its process sentinel: if it dies, every open
request fails with EngineDeadError at once and `is_alive` turns False.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from inference.async_lora import LoRAAdapterInfo, LoRAAdapterNames
from inference.async_snapshot import SharedSnapshotRequest
from inference.core_spawn import SpawnedCore, load_tokenizer, spawn_core
from inference.core_codec import Codec
from inference.core_protocol import (
    CORE_INPUTS,
    CORE_OUTPUTS,
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreReady,
    KVSnapshot,
    LoadLoRAAdapter,
    LoRAAdapterReply,
    ResetPrefixCache,
    Shutdown,
    SnapshotKV,
    StepOutputs,
    UnloadLoRAAdapter,
    check_request,
)
from inference.output_processor import OutputProcessor
from inference.outputs import RequestOutput
from inference.request_stream import EngineDeadError, RequestFailedError, RequestStream
from inference.sampling_params import SamplingParams

if TYPE_CHECKING:
    from inference.config import EngineConfig
    from inference.core_protocol import EngineStats
    from inference.engine_core import EngineCore

logger = logging.getLogger(__name__)

MAX_MESSAGES_PER_READ = 64  # core messages handled before the streams get the event loop


class AsyncLLM:
    def __init__(
        self,
        core: SpawnedCore | Callable[[], EngineCore],
        stats_logger: Callable[[list[RequestOutput], EngineStats], None] | None = None,
        tokenizer_folder: str | None = None,
    ) -> None:
        """Adopt a core process started by `spawn_core`, or start one with
        `core`, the factory that builds the core in it, which must be
        picklable (a module-level function or a partial of one).

        `stats_logger(outputs, stats)`, if given, runs on the event loop for
        every message from the core (once the core is loaded, after every
        step, and after adds or aborts applied while idle), before the
        outputs reach their streams.

        `tokenizer_folder`, when the model's folder is known before the core
        has loaded it, starts loading the detokenizer's tokenizer at once, in
        parallel with the core, rather than after it.
        """
        self._stats_logger = stats_logger
        self._streams: dict[str, RequestStream] = {}
        self._num_unaccepted = 0  # adds the core has not applied yet
        self._ready = asyncio.Event()
        self._stats: EngineStats | None = None
        self._processor: OutputProcessor | None = None
        self._kv_snapshot = SharedSnapshotRequest()
        self.lora = LoRAAdapterNames()
        self.config: EngineConfig | None = None
        self.vocab_size = 0
        self.startup_seconds: dict[str, float] = {}  # the core's start-up phases, once ready
        self._tokenizer = asyncio.ensure_future(asyncio.to_thread(load_tokenizer, tokenizer_folder)) \
            if tokenizer_folder else None
        self.dead_error: BaseException | None = None
        spawned = core if isinstance(core, SpawnedCore) else spawn_core(core)
        self._socket_dir = spawned.socket_dir
        self._context = zmq.asyncio.Context()
        # A plain (not asyncio) socket: with no high-water mark a send to a
        # connected core queues at once, so the event loop never waits on it.
        self._inputs = zmq.Socket(self._context, zmq.PUSH)
        self._inputs.setsockopt(zmq.SNDHWM, 0)
        self._inputs.bind(spawned.input_address)
        self._outputs = self._context.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.RCVHWM, 0)
        self._outputs.bind(spawned.output_address)
        self._input_codec = Codec(CORE_INPUTS)
        self._output_codec = Codec(CORE_OUTPUTS)
        self._process = spawned.process
        loop = asyncio.get_running_loop()
        loop.add_reader(self._process.sentinel, self._core_exited)
        self._reader = asyncio.create_task(self._read_outputs())

    # ---- state -----------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.is_alive

    @property
    def is_alive(self) -> bool:
        return self.dead_error is None and self._process.is_alive()

    @property
    def core_pid(self) -> int | None:
        return self._process.pid

    async def wait_ready(self) -> None:
        """Return once the core is loaded; raise EngineDeadError if loading failed."""
        await self._ready.wait()
        if self.dead_error is not None:
            raise EngineDeadError(f"engine failed to start: {self.dead_error}")

    def stats(self) -> EngineStats | None:
        """The engine's stats as of the core's last message (None before it is loaded)."""
        return self._stats

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the engine's queue plus adds in flight."""
        engine_waiting = self._stats.num_waiting if self._stats is not None else 0
        return engine_waiting + self._num_unaccepted

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- requests --------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> RequestStream:
        """Hand a request to the core; raises ValueError for bad input, so
        callers can answer with an error before they start streaming."""
        if not self.is_ready:
            raise EngineDeadError("engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        processor = self._processor
        if isinstance(prompt, str):
            prompt_text, token_ids = prompt, processor.tokenizer.encode(prompt)
        else:
            prompt_text, token_ids = None, list(prompt)
        check_request(token_ids, params, self.config, self.vocab_size)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        stream = RequestStream(request_id, self._abort)
        self._streams[request_id] = stream
        processor.add(request_id, prompt_text, token_ids, params, arrival)
        self._num_unaccepted += 1
        self._send(AddRequest(request_id, token_ids, params, arrival, priority, cache_salt, lora_name))
        return stream

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; closing or cancelling the iterator aborts it."""
        stream = await self.add_request(
            request_id, prompt, params, priority=priority, arrival_time=arrival_time, cache_salt=cache_salt,
            lora_name=lora_name,
        )
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    async def kv_snapshot(self) -> KVSnapshot:
        """The KV cache's blocks and holders, taken by the core between two steps."""
        if not self.is_ready:
            raise EngineDeadError("engine is not running")
        return await self._kv_snapshot.get(lambda: self._send(SnapshotKV()))

    async def change_lora(self, command: LoadLoRAAdapter | UnloadLoRAAdapter) -> LoRAAdapterReply:
        """Load or unload a LoRA adapter in the core; its answer (status 200 on success)."""
        if not self.is_ready:
            raise EngineDeadError("engine is not running")
        return await self.lora.change(command, self._send)

    def reset_prefix_cache(self) -> None:
        """Have the core forget every cached prefix before its next step."""
        if not self.is_ready:
            raise EngineDeadError("engine is not running")
        self._send(ResetPrefixCache())

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core process and fail whatever is still open."""
        if self.dead_error is None:
            self.dead_error = EngineDeadError("engine shut down")
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        if self._process.is_alive():
            try:
                self._send(Shutdown())
                await asyncio.to_thread(self._process.join, timeout)
            except EngineDeadError:
                pass  # still loading, not listening yet: kill it below
            if self._process.is_alive():
                logger.error("engine core did not stop; killing it")
                self._process.kill()
                await asyncio.to_thread(self._process.join)
        self._reader.cancel()
        self._fail_all(EngineDeadError("engine shut down"))
        self._inputs.close(linger=0)
        self._outputs.close(linger=0)
        self._context.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def abort_all(self, reason: str) -> None:
        """Stop every open request in the core and end its stream with
        RequestFailedError(reason) (the server's drain deadline)."""
        for request_id, stream in list(self._streams.items()):
            self._abort(request_id)
            stream._put(RequestFailedError(reason))

    def _send(self, message: AddRequest | AbortRequests | Shutdown | SnapshotKV | ResetPrefixCache
              | LoadLoRAAdapter | UnloadLoRAAdapter) -> None:
        try:
            self._inputs.send(self._input_codec.encode(message), zmq.NOBLOCK)
        except zmq.Again:  # only a core that never connected refuses
            raise EngineDeadError("the engine core is not connected") from None

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None or self._processor is None:
            return
        sample_ids = self._processor.abort(request_id, time.monotonic())
        if sample_ids and self.is_alive:
            try:
                self._send(AbortRequests(sample_ids))
            except EngineDeadError:
                pass  # the core just died: nothing left to abort

    # ---- messages from the core -------------------------------------------

    async def _read_outputs(self) -> None:
        try:
            await self._dispatch_outputs()
        except Exception as exc:  # a bug here must fail the requests, not hang them
            logger.exception("reading the engine core's outputs failed")
            self._die(f"output reader failed: {exc!r}")

    async def _dispatch_outputs(self) -> None:
        sock = self._outputs
        while True:
            frames = [await sock.recv(copy=False)]
            # Take what else has arrived before the streams run: when this side
            # fell behind, each stream then sends one chunk for several steps.
            # Bounded, and followed by a yield (a ready message comes back
            # without one), so a fast core cannot starve the HTTP server.
            while len(frames) < MAX_MESSAGES_PER_READ and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frames.append(await sock.recv(copy=False))
            for frame in frames:
                message = self._output_codec.decode(frame.buffer)
                if isinstance(message, StepOutputs):
                    self._on_step(message)
                elif isinstance(message, KVSnapshot):
                    self._kv_snapshot.resolve(message)
                elif isinstance(message, LoRAAdapterReply):
                    self.lora.resolve(message)
                elif isinstance(message, CoreReady):
                    await self._on_ready(message)
                elif isinstance(message, CoreFailed):
                    self._die(message.error)
            await asyncio.sleep(0)

    async def _on_ready(self, ready: CoreReady) -> None:
        # Our own tokenizer instance: the server tokenizes prompts on another
        # thread, and a fast tokenizer must not be used from two at once.
        tokenizer = await (self._tokenizer or asyncio.to_thread(load_tokenizer, ready.config.model))
        self._processor = OutputProcessor(tokenizer)
        self.config, self.vocab_size = ready.config, ready.vocab_size
        self.startup_seconds = ready.startup_seconds
        if ready.config.lora is not None:
            self.lora.adapters = {m.name: LoRAAdapterInfo(m.name, m.path, m.base_model_name)
                                  for m in ready.config.lora.modules}
        self._stats = ready.stats
        self._log_stats([], ready.stats)
        self._ready.set()

    def _on_step(self, step: StepOutputs) -> None:
        processor = self._processor
        self._num_unaccepted -= step.num_adds
        now = time.monotonic()
        for request_id, error in step.rejected:
            processor.drop(request_id)
            self._fail(request_id, RequestFailedError(error))
        for request_id in step.failed:
            processor.abort(request_id, now)  # the abort shows in the metrics; the caller gets the error
            self._fail(request_id, RequestFailedError(step.failure))
        outputs, stopped = processor.process(step)
        if stopped:
            self._send(AbortRequests(stopped))
        self._stats = step.stats
        # Metrics first: a client that has its output sees it in /metrics.
        self._log_stats(outputs, step.stats)
        streams = self._streams
        for output in outputs:
            stream = streams.get(output.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if output.finished:
                del streams[output.request_id]
            stream._put(output)

    def _log_stats(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        if self._stats_logger is None:
            return
        try:
            self._stats_logger(outputs, stats)
        except Exception:  # metrics must never stop the engine
            logger.exception("stats logger failed; metrics are off from now on")
            self._stats_logger = None

    # ---- failures ---------------------------------------------------------

    def _core_exited(self) -> None:
        asyncio.get_running_loop().remove_reader(self._process.sentinel)
        self._process.join()
        self._die(f"engine core process exited with code {self._process.exitcode}")

    def _die(self, reason: str) -> None:
        if self.dead_error is None:
            logger.error("engine core died: %s", reason)
            self.dead_error = EngineDeadError(reason)
        self._fail_all(EngineDeadError(f"engine core died: {reason}"))

    def _fail(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(error)

    def _fail_all(self, error: BaseException) -> None:
        self._num_unaccepted = 0
        self._kv_snapshot.fail(error)
        self.lora.fail(error)
        for request_id in list(self._streams):
            self._fail(request_id, error)
        self._ready.set()  # wake wait_ready() so it can report the failure
