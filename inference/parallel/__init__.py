"""Tensor parallelism: one model split across `tensor_parallel_size` ranks.

    group.py         the process group (gloo on the CPU, NCCL on CUDA) and its collectives
    layers.py        head/vocab sharding and the column/row/vocab-parallel layers
    step_message.py  one step's runner inputs packed into one int64 array
    workers.py       rank 0's side: spawn ranks 1..N-1, send steps, watch them die
    worker_main.py   a rank's process: load its shard, run each step's forward

Rank 0 runs where the engine core runs, beside the one scheduler and block
manager; it sends each step's prepared inputs to the other ranks, every rank
runs the forward in lockstep (all-reduces after o_proj and down, a gather of
the vocab-parallel logits) and rank 0 alone samples. With one rank nothing
here runs a collective and the model is the single-device one.
"""
