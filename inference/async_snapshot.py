"""The front end's side of KV snapshots: one request to the core at a time.

Callers that ask while a snapshot is on its way share its reply, so any
number of console viewers cost the core one snapshot per round trip.
Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from inference.core_protocol import KVSnapshot


class SharedSnapshotRequest:
    def __init__(self) -> None:
        self._reply: asyncio.Future[KVSnapshot] | None = None

    async def get(self, send_request: Callable[[], None]) -> KVSnapshot:
        """The next snapshot; `send_request` asks the core unless a request is pending."""
        if self._reply is None:
            reply = asyncio.get_running_loop().create_future()
            send_request()  # raises before anything is pending if the core is gone
            self._reply = reply
        # Shielded: one caller giving up must not cancel the others' reply.
        return await asyncio.shield(self._reply)

    def resolve(self, snapshot: KVSnapshot) -> None:
        reply, self._reply = self._reply, None
        if reply is not None and not reply.done():
            reply.set_result(snapshot)

    def fail(self, error: BaseException) -> None:
        reply, self._reply = self._reply, None
        if reply is not None and not reply.done():
            reply.set_exception(error)
            reply.exception()  # retrieved here: no "never retrieved" warning if nobody waits
