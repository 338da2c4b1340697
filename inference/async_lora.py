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
        self._reply: asyncio.Future[LoRAAdapterReply] | None = None

    async def change(self, command: LoadLoRAAdapter | UnloadLoRAAdapter,
                     send: Callable[[LoadLoRAAdapter | UnloadLoRAAdapter], None]) -> LoRAAdapterReply:
        """Send `command` and wait for the core's answer; on success, update the names."""
        async with self._lock:
            reply = asyncio.get_running_loop().create_future()
            send(command)  # raises before anything is pending if the core is gone
            self._reply = reply
            answer = await reply
        if answer.status == 200:
            if isinstance(command, LoadLoRAAdapter):
                self.adapters[command.lora_name] = LoRAAdapterInfo(command.lora_name, command.lora_path, None)
            else:
                self.adapters.pop(command.lora_name, None)
        return answer

    def resolve(self, reply: LoRAAdapterReply) -> None:
        pending, self._reply = self._reply, None
        if pending is not None and not pending.done():
            pending.set_result(reply)

    def fail(self, error: BaseException) -> None:
        pending, self._reply = self._reply, None
        if pending is not None and not pending.done():
            pending.set_exception(error)
            pending.exception()  # retrieved here: no "never retrieved" warning if nobody waits
