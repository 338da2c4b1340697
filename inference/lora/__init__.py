"""Multi-LoRA serving: PEFT adapters applied per token on top of the base model.

- `adapter.py` reads and validates a PEFT folder into host tensors.
- `layers.py` wraps the model's linears: stacked per-slot A and B, and the
  per-step batch that says which slot each token uses.
- `residency.py` keeps adapters on the device (`max_loras` slots) and in
  host memory (`max_cpu_loras`), least recently used first out.

Adapter slots are 1..max_loras, slot s stored at row s - 1 of every stacked
tensor; slot 0 means "no adapter" and has no row (it is masked).
"""
