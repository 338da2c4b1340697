"""The front end's side of LoRA adapters: which names exist, and runtime
load/unload round trips to the core.

The core owns the adapters' tensors; this side keeps only names, paths and
parents, so a request's `model` can be resolved (or refused with a 404)
before anything is tokenized. Changes go one at a time (a lock), each
answered by the core's `LoRAAdapterReply`; the name list changes only on a
200. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from inference.async_snapshot import SharedSnapshotRequest
from inference.core_protocol import LoadLoRAAdapter, LoRAAdapterReply, UnloadLoRAAdapter


@dataclass(slots=True)
class LoRAAdapterInfo:
    name: str
    path: str
    parent: str | None  # the base model id to list it under; None: the served name


class LoRAAdapterNames:
    def __init__(self) -> None:
        self.adapters: dict[str, LoRAAdapterInfo] = {}
        self._lock = asyncio.Lock()
        # The core answers in order, one reply per command; with the lock only one is ever
        # pending, so the KV snapshots' shared reply never shares one here.
        self._reply = SharedSnapshotRequest()

    async def change(self, command: LoadLoRAAdapter | UnloadLoRAAdapter,
                     send: Callable[[LoadLoRAAdapter | UnloadLoRAAdapter], None]) -> LoRAAdapterReply:
        """Send `command` and wait for the core's answer; on success, update the names."""
        async with self._lock:
            answer = await self._reply.get(lambda: send(command))
        if answer.status == 200:
            if isinstance(command, LoadLoRAAdapter):
                self.adapters[command.lora_name] = LoRAAdapterInfo(command.lora_name, command.lora_path, None)
            else:
                self.adapters.pop(command.lora_name, None)
        return answer

    def resolve(self, reply: LoRAAdapterReply) -> None:
        self._reply.resolve(reply)

    def fail(self, error: BaseException) -> None:
        self._reply.fail(error)
