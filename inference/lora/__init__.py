"""Multi-LoRA serving: PEFT adapters applied per token on top of the base model.

- `adapter.py` reads and validates a PEFT folder into host tensors.
- `layers.py` wraps the model's linears: stacked per-slot A and B, and the
  per-step batch that says which slot each token uses.
- `residency.py` keeps adapters on the device (`max_loras` slots) and in
  host memory (`max_cpu_loras`), least recently used first out.

Slot 0 of every stacked tensor is all zeros and means "no adapter"; adapter
slots are 1..max_loras.
"""
