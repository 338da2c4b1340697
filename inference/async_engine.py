"""Asyncio front of the engine: one thread owns the LLMEngine and steps it.

Only the loop thread ever touches the engine, including building it, so a
slow model load or a slow step never blocks the event loop. The event loop
hands adds and aborts to that thread through a thread-safe queue; the thread
applies them between steps. Each request has its own asyncio.Queue, filled
from the thread with `loop.call_soon_threadsafe`; the table of open streams
lives on the event loop, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inference.outputs import RequestOutput
from inference.sampling_params import SamplingParams

if TYPE_CHECKING:
    from inference.config import EngineConfig
    from inference.engine import EngineStats, LLMEngine

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The loop thread stopped (failed model load, crash or shutdown)."""


class RequestFailedError(RuntimeError):
    """The engine raised while running this request; other requests go on."""


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    arrival_time: float
    cache_salt: str | None


@dataclass(slots=True)
class _Abort:
    request_id: str


class _Stop:
    pass


class RequestStream:
    """Outputs of one request, in order; ends after the finished output."""

    def __init__(self, request_id: str, owner: AsyncLLM) -> None:
        self.request_id = request_id
        self.finished = False
        self._owner = owner
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        # resolved once the loop thread has accepted or rejected the request
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop the request and free its blocks; a no-op once it has finished."""
        if not self.finished:
            self.finished = True
            self._owner._abort(self.request_id)

    def _fail(self, error: BaseException) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error)
            # nobody awaits `accepted` if the caller was cancelled meanwhile
            self.accepted.exception()
        self._queue.put_nowait(error)


class AsyncLLM:
    def __init__(
        self,
        engine_factory: Callable[[], LLMEngine],
        stats_logger: Callable[[list[RequestOutput], EngineStats], None] | None = None,
    ) -> None:
        """Start the loop thread; it builds the engine with `engine_factory`.

        `stats_logger(outputs, stats)`, if given, runs on the loop thread
        after every step (and with no outputs once the engine is built, and
        while idle); it must be quick and must not touch the engine.
        """
        self._loop = asyncio.get_running_loop()
        self._engine_factory = engine_factory
        self._stats_logger = stats_logger
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event loop only
        self._num_unaccepted = 0  # adds the loop thread has not applied yet
        self._ready = asyncio.Event()
        self._stats: EngineStats | None = None  # snapshot, replaced whole by the thread
        self.config: EngineConfig | None = None
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- event loop side -------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.is_alive

    @property
    def is_alive(self) -> bool:
        return self.dead_error is None and self._thread.is_alive()

    async def wait_ready(self) -> None:
        """Return once the engine is loaded; raise EngineDeadError if loading failed."""
        await self._ready.wait()
        if self.dead_error is not None:
            raise EngineDeadError(f"engine failed to start: {self.dead_error!r}")

    def stats(self) -> EngineStats | None:
        """The engine's stats as of the last step (None before the first)."""
        return self._stats

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: the engine's queue plus adds in flight."""
        engine_waiting = self._stats.num_waiting if self._stats is not None else 0
        return engine_waiting + self._num_unaccepted

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Queue a request and wait until the engine took it.

        Raises the engine's ValueError for bad input, so callers can answer
        with an error before they start streaming.
        """
        if not self.is_alive:
            raise EngineDeadError("engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        self._num_unaccepted += 1
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._commands.put(_Add(request_id, prompt, params, priority, arrival, cache_salt))
        try:
            await asyncio.shield(stream.accepted)
        except asyncio.CancelledError:
            stream.abort()
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
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
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; closing or cancelling the iterator aborts it."""
        stream = await self.add_request(
            request_id, prompt, params, priority=priority, arrival_time=arrival_time, cache_salt=cache_salt
        )
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread and fail whatever is still open."""
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join, timeout)
        self._fail_all(EngineDeadError("engine shut down"))

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(_Abort(request_id))

    def _accepted(self, request_id: str, error: BaseException | None) -> None:
        self._num_unaccepted -= 1
        stream = self._streams.get(request_id)
        if stream is None or stream.accepted.done():
            return
        if error is None:
            stream.accepted.set_result(None)
        else:
            self._streams.pop(request_id)
            stream.accepted.set_exception(error)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream._queue.put_nowait(output)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._fail(error)

    def _fail_all(self, error: BaseException) -> None:
        self._num_unaccepted = 0
        self._fail(list(self._streams), error)
        self._ready.set()  # wake wait_ready() so it can report the failure

    def _call_in_loop(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # event loop already closed: nobody is listening
            pass

    # ---- loop thread -----------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._engine_factory()
            self.config = engine.config
            self._stats = engine.stats()
            self._log_stats([], self._stats)
            self._call_in_loop(self._ready.set)
            self._serve(engine)
        except BaseException as exc:  # noqa: BLE001 - any crash must reach /health
            logger.exception("engine loop died")
            self.dead_error = exc
            self._call_in_loop(self._fail_all, EngineDeadError(f"engine loop died: {exc!r}"))

    def _serve(self, engine: LLMEngine) -> None:
        from inference.engine import StepError

        request_ids: set[str] = set()  # requests the engine holds
        while True:
            if not self._apply_commands(engine, request_ids, block=not engine.has_unfinished_requests()):
                return
            outputs: list[RequestOutput] = []
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except StepError as exc:
                    # Only the requests of the failed step are lost.
                    logger.exception("engine step failed; failing %d requests", len(exc.request_ids))
                    self._call_in_loop(self._fail, exc.request_ids, RequestFailedError(str(exc)))
                    request_ids.difference_update(exc.request_ids)
                    outputs = []
                except Exception as exc:
                    # Failed outside the forward pass: which requests are hurt
                    # is unknown, so every request it holds is failed and
                    # aborted; the loop and later requests go on.
                    logger.exception("engine step failed; failing %d requests", len(request_ids))
                    for request_id in request_ids:
                        engine.abort_request(request_id)
                    self._call_in_loop(self._fail, list(request_ids), RequestFailedError(f"engine error: {exc!r}"))
                    request_ids.clear()
                    outputs = []
                request_ids.difference_update(o.request_id for o in outputs if o.finished)
            self._stats = engine.stats()
            # Metrics first: a client that has its output sees it in /metrics.
            self._log_stats(outputs, self._stats)
            if outputs:
                self._call_in_loop(self._deliver, outputs)

    def _log_stats(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        if self._stats_logger is None:
            return
        try:
            self._stats_logger(outputs, stats)
        except Exception:  # metrics must never stop the engine
            logger.exception("stats logger failed; metrics are off from now on")
            self._stats_logger = None

    def _apply_commands(self, engine: LLMEngine, request_ids: set[str], *, block: bool) -> bool:
        """Apply queued adds and aborts; False once asked to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(command, _Stop):
                return False
            if isinstance(command, _Abort):
                engine.abort_request(command.request_id)
                request_ids.discard(command.request_id)
                continue
            try:
                engine.add_request(
                    command.request_id,
                    command.prompt,
                    command.params,
                    priority=command.priority,
                    arrival_time=command.arrival_time,
                    cache_salt=command.cache_salt,
                )
            except Exception as exc:  # bad input fails this request only
                self._call_in_loop(self._accepted, command.request_id, exc)
            else:
                request_ids.add(command.request_id)
                self._call_in_loop(self._accepted, command.request_id, None)
