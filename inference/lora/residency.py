"""Where each registered adapter lives: device slot, host memory, or disk.

    register(name, path)   read and check the folder now (a bad one fails here)
    request_slots(names)   give every adapter of this step a device slot; each request's slot
                           (`loads`: what it swapped in, for the other tensor-parallel ranks)
    load_slots(loads)      another rank's side: the same adapters into the same slots
    set_token_slots(...)   tell the wrapped linears which slot each token reads
    unregister(name)       forget it (the caller checks nothing still uses it)

Invariants:
- `max_loras` device slots, numbered 1..max_loras (slot 0 is "no adapter").
  A free slot's weights are stale and never read: no token maps to it.
  `activate` is never asked for more distinct adapters than that in one step
  (the scheduler's limit); a missing one takes the least recently used slot
  not needed by this step.
- At most `max_cpu_loras` adapters keep their tensors in host memory, least
  recently used out first; an evicted one is read from its folder again when
  next needed. Registration keeps the freshly read one.
- Every registered adapter has a distinct `lora_id` >= 1, never reused.
- Tensor parallelism: rank 0 alone registers and picks slots; every swap-in
  reaches the other ranks as a `SlotLoad` in the step that needs it, before
  its forward, and they read the folder themselves (each keeps its shard).
  A rank > 0 knows an adapter by its `lora_id`, so a name unloaded and
  loaded again from changed files is read anew.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inference.lora.adapter import LoRAAdapter, LoRAError, load_adapter
from inference.lora.config import LoRAConfig
from inference.lora.layers import wrap_model

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SlotLoad:
    """An adapter rank 0 swapped into a device slot this step."""

    slot: int
    lora_id: int
    name: str
    path: str


class LoRAInUseError(RuntimeError):
    """An adapter cannot be unloaded while requests still use it."""


@dataclass(slots=True)
class RegisteredLoRA:
    name: str
    path: str
    lora_id: int


class LoRAResidency:
    def __init__(self, model: nn.Module, hf_config, config: LoRAConfig) -> None:
        """Wrap the loaded `model`'s linears with `max_loras` adapter slots."""
        self.hf_config = hf_config
        self.batch, self.wrapped = wrap_model(model, config.max_loras, config.max_lora_rank)
        self.max_lora_rank = config.max_lora_rank
        self.max_cpu_loras = config.max_cpu_loras
        self.registered: dict[str, RegisteredLoRA] = {}
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self.slots: OrderedDict[str, int] = OrderedDict()  # resident name -> slot, least recently used first
        self.free_slots = list(range(config.max_loras, 0, -1))
        self._ids = itertools.count(1)
        self.num_loads_from_disk = 0
        self.num_swaps_in = 0
        self.loads: list[SlotLoad] = []  # what the last `request_slots` swapped in

    def register(self, name: str, path: str) -> RegisteredLoRA:
        if name in self.registered:
            raise LoRAError(f"The lora adapter '{name}' has already been loaded.")
        adapter = load_adapter(name, path, self.hf_config, self.max_lora_rank)
        entry = RegisteredLoRA(name, path, next(self._ids))
        self.registered[name] = entry
        self._keep_on_host(adapter)
        return entry

    def unregister(self, name: str) -> None:
        self.registered.pop(name)
        self.host.pop(name, None)
        slot = self.slots.pop(name, None)
        if slot is not None:
            self.free_slots.append(slot)

    def request_slots(self, names: list[str | None]) -> np.ndarray:
        """The device slot of each request's adapter (0: none), swapping in what is missing."""
        slots = self.activate({name for name in names if name is not None})
        return np.fromiter((0 if name is None else slots[name] for name in names), np.int32, len(names))

    def set_token_slots(self, device_slots: torch.Tensor, host_slots: np.ndarray) -> None:
        """Point the wrapped linears at this step's per-token slots (the host copy says whether any is set)."""
        self.batch.set(device_slots if host_slots.any() else None)

    def activate(self, names: set[str]) -> dict[str, int]:
        """name -> device slot for each adapter of the step, swapping in what is missing (`loads`)."""
        for name in names:
            if name in self.slots:
                self.slots.move_to_end(name)
        self.loads = []
        for name in names - self.slots.keys():
            slot = self.free_slots.pop() if self.free_slots else self._evict_slot(names)
            entry = self.registered[name]
            self.loads.append(SlotLoad(slot, entry.lora_id, name, entry.path))
            self.slots[name] = slot
        self._write_slots(self.loads)
        return {name: self.slots[name] for name in names}

    def load_slots(self, loads: list[SlotLoad]) -> None:
        """A rank > 0: write the adapters rank 0 swapped in this step into the same slots."""
        for load in loads:
            entry = self.registered.get(load.name)
            if entry is None or entry.lora_id != load.lora_id:
                self.registered[load.name] = RegisteredLoRA(load.name, load.path, load.lora_id)
                self.host.pop(load.name, None)
        self._write_slots(loads)

    def _write_slots(self, loads: list[SlotLoad]) -> None:
        for load in loads:
            adapter = self._host_copy(load.name)
            for linear in self.wrapped:
                linear.set_slot(load.slot, adapter)
            self.num_swaps_in += 1
        if loads:
            for linear in self.wrapped:
                linear.repack()

    def _evict_slot(self, needed: set[str]) -> int:
        victim = next(name for name in self.slots if name not in needed)
        return self.slots.pop(victim)

    def _host_copy(self, name: str) -> LoRAAdapter:
        adapter = self.host.get(name)
        if adapter is not None:
            self.host.move_to_end(name)
            return adapter
        entry = self.registered[name]
        adapter = load_adapter(name, entry.path, self.hf_config, self.max_lora_rank)
        self.num_loads_from_disk += 1
        self._keep_on_host(adapter)
        return adapter

    def _keep_on_host(self, adapter: LoRAAdapter) -> None:
        self.host[adapter.name] = adapter
        while len(self.host) > self.max_cpu_loras:
            evicted, _ = self.host.popitem(last=False)
            logger.info("LoRA adapter %s leaves host memory (max_cpu_loras %d)", evicted, self.max_cpu_loras)
