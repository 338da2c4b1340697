"""What a caller of the async engine holds: one stream of outputs per request,
and the errors that end a stream early."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from inference.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine core stopped (failed model load, crash or shutdown)."""


class RequestFailedError(RuntimeError):
    """The engine raised while running this request; other requests go on."""


class RequestStream:
    """Outputs of one request, in order; ends after the finished output.

    Outputs are cumulative, so an unread output is replaced by the next one:
    a reader that fell behind gets the latest, and under load a chunk carries
    several tokens instead of the server falling further behind one token at
    a time; a slow client holds one output, not one per step."""

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.finished = False
        self._abort = abort  # the engine's: tells the core to stop the request
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        items = self._items
        while not items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item = items.popleft()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        """Stop the request and free its blocks; a no-op once it has finished."""
        if not self.finished:
            self.finished = True
            self._abort(self.request_id)

    def _put(self, item: RequestOutput | BaseException) -> None:
        items = self._items
        if items and isinstance(item, RequestOutput) and isinstance(items[-1], RequestOutput):
            items[-1] = item  # the newer output holds everything the unread one did
        else:
            items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
