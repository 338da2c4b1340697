"""Decode and speculative verify steps through CUDA graphs: captured forwards per batch bucket.

A decode step is small and its cost on a GPU is the host launching ~10
kernels per layer; a CUDA graph replays all of them with one launch. A
decode-only batch of n requests runs the graph of the smallest bucket >= n
(buckets 1, 2, 4, 8, then every 16, and `max_num_seqs`, or the sizes given
by `cudagraph_capture_sizes`, up to `max_cudagraph_capture_size`: each
bucket is one capture at start-up, so these bound its time; larger decode
batches run eagerly); rows n..bucket-1
are padding prepared by `StepBuffers` (scratch-block slots, `seq_len` 1,
never sampled). Mixed and prefill steps stay eager.

With speculative decoding (k = `num_speculative_tokens`), each bucket b
also gets a verify graph: b rows of query length up to k + 1, b * (k + 1)
tokens, `max_query_len` k + 1, through the paged prefill attention kernel.
A step replays it when every request is a decode or verify row (its last
token plus d <= k drafts, nothing else) and at least one has drafts; a step
with none replays the decode graph. The layout is the eager one, padded at
the end: the real rows keep their real query lengths and token positions
(so the rows `plan_logits` samples are the eager rows), rows n..b-1 are
decode-style padding rows, and the tokens left over up to b * (k + 1)
belong to no row: attention never writes their output rows (the kernels'
contract), and they store their key and value in the scratch block like
every padding token. Padding each request's query up to k + 1 instead would
put its padding tokens after its real ones, and the kernel would read their
keys through the request's block table up to k - d positions past its end
(past `max_model_len` and the table's last column for a request at the
limit); it would also move the sampled rows away from the eager ones.

Invariants:
- A graph reads only the persistent `StepBuffers` device tensors, the KV cache
  and the weights, whose addresses never change, and writes its own static
  hidden-state output; replaying it runs the same kernels on whatever the
  buffers hold now.
- Nothing that changes between steps reaches a launch: the attention metadata
  of a graph carries `max_query_len` 1 (decode) or k + 1 (verify) and
  `max_seq_len` = `max_model_len`, so the decode kernel's grid and split
  count, and the prefill kernel's grid (query tiles of k + 1 tokens x rows x
  KV heads) and tile config (tuned per length bucket), depend on the shape
  alone; each program reads its row's real query length and `seq_len` from
  `query_start_loc` and `seq_lens` in device memory and returns early past
  them. The split buffers are the runner's preallocated workspace.
- A graph's shape is (`num_padded_reqs`, `max_query_len`) of its batch, and
  both travel to the other tensor-parallel ranks in the step's plan, so
  every rank runs the same shape (on a GPU tensor parallelism runs eagerly
  today, see `EngineConfig`; on the CPU the ranks run the padded batches).
- Graphs are captured largest first (verify before decode, each largest
  bucket first) into one memory pool, so the smaller graphs reuse the
  largest one's activation memory. Each shape runs eagerly
  on the capture stream first (Triton compiles, the prefill autotuner picks
  its config, cuBLAS creates its handles), because none may happen during capture.
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
from inference.request import Request
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
                 lora: LoRABatch | None = None, verify_len: int | None = None) -> None:
        """`verify_len`: k + 1 with speculative decoding (each bucket gets a verify graph too), else None."""
        self.model = model
        self.buffers = buffers
        self.lora = lora
        self.buckets = buckets
        self.max_model_len = max_model_len
        self.verify_len = verify_len
        # decode graphs and their static outputs by bucket
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # verify graphs and their static outputs by bucket
        self.verify_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.verify_outputs: dict[int, torch.Tensor] = {}
        self.capture_bytes = 0  # device memory the capture took (its pool and outputs)

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, num_reqs: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, num_reqs)]

    def shape_for(self, scheduled: list[tuple[Request, int]],
                  spec_token_ids: dict[str, list[int]]) -> tuple[int, int] | None:
        """(bucket, query length) of the graph that runs this step: query length 1
        when every request runs one token, `verify_len` when every request runs
        its last token plus at most k drafts and one has drafts; None (eager)
        for any other step, or one with more requests than the largest bucket."""
        if len(scheduled) > self.max_batch_size:
            return None
        query_len = 1
        for request, num_new in scheduled:
            # A row with more tokens than its drafts and one is (part of) a prompt.
            if num_new != 1 + len(spec_token_ids.get(request.request_id, ())):
                return None
            query_len = max(query_len, num_new)
        if query_len > 1:
            if self.verify_len is None or query_len > self.verify_len:
                return None
            query_len = self.verify_len
        return self.bucket_for(len(scheduled)), query_len

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        input_ids, positions = self.buffers.inputs(batch)
        return self.model(input_ids, positions, self.buffers.metadata(batch, max_seq_len=self.max_model_len))

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Hidden states of a prepared batch padded to a graph shape (`shape_for`):
        decode when its `max_query_len` is 1, verify otherwise."""
        verify = batch.max_query_len > 1
        graph = (self.verify_graphs if verify else self.graphs).get(batch.num_padded_reqs)
        if graph is None:
            return self._forward(batch)
        graph.replay()
        return (self.verify_outputs if verify else self.outputs)[batch.num_padded_reqs]

    def bind_lora(self, batch: StepBatch) -> None:
        """Before a capture: no adapter in the buffer's slots, and the LoRA kernels on, reading them."""
        if self.lora is not None:
            self.buffers.set_lora_slots(np.zeros(0, np.int32), batch)
            self.lora.set(self.buffers.lora_slots(batch)[0])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every shape (decode, and verify with speculation, per bucket) on the
        current CUDA device; raise naming the shape if one fails, so the engine never
        starts half-working."""
        verify = f" and {len(self.buckets)} verify graphs ({self.verify_len} tokens a row)" if self.verify_len else ""
        logger.info(
            "capturing %d decode CUDA graphs%s (batch sizes %s); larger decode batches run eagerly "
            "(--max-cudagraph-capture-size and --cudagraph-capture-sizes bound the count)",
            len(self.buckets), verify, ",".join(map(str, self.buckets)),
        )
        start = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info()
        stream = torch.cuda.Stream()
        pool = torch.cuda.graph_pool_handle()
        # Largest activations first: verify shapes (k + 1 tokens a row), then decode, each largest bucket first.
        shapes = [(size, query_len) for query_len in (self.verify_len, 1) if query_len
                  for size in reversed(self.buckets)]
        for size, query_len in shapes:
            batch = StepBatch(
                num_reqs=0, num_padded_reqs=size, num_tokens=0, num_padded_tokens=size * query_len,
                max_query_len=query_len, max_seq_len=self.max_model_len,
            )
            # All rows padding (valid slots, seq_len 1), the verify shape's other tokens in no row.
            self.buffers.prepare([], size, graph_query_len=query_len)
            self.bind_lora(batch)
            try:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    # Warm-up outside capture, twice: a geometry's first prefill call may go through the
                    # autotuner, and only the next through the cached launch handle the capture records.
                    for _ in range(2 if query_len > 1 else 1):
                        self._forward(batch)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    output = self._forward(batch)
            except Exception as exc:
                what = "decode" if query_len == 1 else f"verify ({query_len} tokens a row)"
                raise RuntimeError(
                    f"CUDA graph capture failed for the {what} batch size {size}: {exc!r}. "
                    "Start with --enforce-eager (enforce_eager=True) to run without CUDA graphs."
                ) from exc
            graphs, outputs = (self.graphs, self.outputs) if query_len == 1 else (self.verify_graphs,
                                                                                  self.verify_outputs)
            graphs[size] = graph
            outputs[size] = output
        if self.lora is not None:
            self.lora.set(None)  # each step sets its own
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        self.capture_bytes = free_before - free_after
        logger.info(
            "captured %d decode and %d verify CUDA graphs (batch sizes %d..%d) in %.1f s using %.0f MiB",
            len(self.graphs), len(self.verify_graphs), self.buckets[0], self.buckets[-1],
            time.perf_counter() - start, self.capture_bytes / 2**20,
        )
