"""Decode steps through CUDA graphs: one captured model forward per batch bucket.

A decode step is small and its cost on a GPU is the host launching ~10
kernels per layer; a CUDA graph replays all of them with one launch. A
decode-only batch of n requests runs the graph of the smallest bucket >= n
(buckets 1, 2, 4, 8, then every 16, and `max_num_seqs`, or the sizes given
by `cudagraph_capture_sizes`, up to `max_cudagraph_capture_size`: each
bucket is one capture at start-up, so these bound its time; larger decode
batches run eagerly); rows n..bucket-1
are padding prepared by `StepBuffers` (scratch-block slots, `seq_len` 1,
never sampled). Mixed and prefill steps stay eager.

Invariants:
- A graph reads only the persistent `StepBuffers` device tensors, the KV cache
  and the weights, whose addresses never change, and writes its own static
  hidden-state output; replaying it runs the same kernels on whatever the
  buffers hold now.
- Nothing that changes between steps reaches a launch: the attention metadata
  of a graph carries `max_query_len` 1 and `max_seq_len` = `max_model_len`, so
  the decode kernel's grid and split count depend on the bucket alone, and
  each program reads its request's real `seq_len` from device memory. The
  split buffers are the runner's preallocated workspace.
- Buckets are captured largest first into one memory pool, so the smaller
  graphs reuse the largest one's activation memory. Each bucket runs eagerly
  once on the capture stream first (Triton compiles, cuBLAS creates its
  handles), because neither may happen during capture.
- With LoRA on, every graph is captured with the LoRA kernels in, whatever
  adapters the capture batch used (none): they read each token's slot from
  the step buffers' `lora_slots` and the adapters from the fixed stacked
  tensors that swaps overwrite in place, so a replay serves this step's mix
  and this step's adapters; a slot-0 token costs their launch, not their reads.
- On the CPU nothing is captured: `run` executes the same padded batch
  eagerly, which is how the tests check the padded path without a GPU.
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from inference.lora.layers import LoRABatch
from inference.step_buffers import StepBatch, StepBuffers

logger = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int, max_capture_size: int | None = None,
                   capture_sizes: tuple[int, ...] | None = None) -> list[int]:
    """Batch sizes that get a graph: `capture_sizes`, or by default 1, 2, 4, 8,
    then every 16, and the largest; none over `max_capture_size` (default
    `max_num_seqs`) or `max_num_seqs` (a batch never has more rows)."""
    largest = min(max_capture_size or max_num_seqs, max_num_seqs)
    if capture_sizes is None:
        capture_sizes = (1, 2, 4, 8, *range(16, largest, 16), largest)
    return sorted({size for size in capture_sizes if size <= largest})


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, buffers: StepBuffers, buckets: list[int], max_model_len: int,
                 lora: LoRABatch | None = None) -> None:
        self.model = model
        self.buffers = buffers
        self.lora = lora
        self.buckets = buckets
        self.max_model_len = max_model_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_bytes = 0  # device memory the capture took (its pool and outputs)

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, num_reqs: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, num_reqs)]

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        input_ids, positions = self.buffers.inputs(batch)
        return self.model(input_ids, positions, self.buffers.metadata(batch, max_seq_len=self.max_model_len))

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Hidden states of a prepared decode batch padded to one of the buckets."""
        graph = self.graphs.get(batch.num_padded_reqs)
        if graph is None:
            return self._forward(batch)
        graph.replay()
        return self.outputs[batch.num_padded_reqs]

    def bind_lora(self, batch: StepBatch) -> None:
        """Before a capture: no adapter in the buffer's slots, and the LoRA kernels on, reading them."""
        if self.lora is not None:
            self.buffers.set_lora_slots(np.zeros(0, np.int32), batch)
            self.lora.set(self.buffers.lora_slots(batch)[0])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket on the current CUDA device; raise naming the
        bucket if one fails, so the engine never starts half-working."""
        logger.info(
            "capturing %d decode CUDA graphs (batch sizes %s); larger decode batches run eagerly "
            "(--max-cudagraph-capture-size and --cudagraph-capture-sizes bound the count)",
            len(self.buckets), ",".join(map(str, self.buckets)),
        )
        start = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info()
        stream = torch.cuda.Stream()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):
            batch = StepBatch(
                num_reqs=0, num_padded_reqs=size, num_tokens=0, num_padded_tokens=size,
                max_query_len=1, max_seq_len=self.max_model_len,
            )
            self.buffers.prepare([], size)  # all rows padding: valid slots, seq_len 1
            self.bind_lora(batch)
            try:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._forward(batch)  # warm-up outside capture
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    output = self._forward(batch)
            except Exception as exc:
                raise RuntimeError(
                    f"CUDA graph capture failed for the decode batch size {size}: {exc!r}. "
                    "Start with --enforce-eager (enforce_eager=True) to run without CUDA graphs."
                ) from exc
            self.graphs[size] = graph
            self.outputs[size] = output
        if self.lora is not None:
            self.lora.set(None)  # each step sets its own
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        self.capture_bytes = free_before - free_after
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s using %.0f MiB",
            len(self.graphs), self.buckets[0], self.buckets[-1], time.perf_counter() - start,
            self.capture_bytes / 2**20,
        )
