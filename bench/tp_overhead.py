"""What tensor parallelism costs on the CPU: TP=2 against TP=1 at batch 16,
and which way of handing each step to the other ranks is cheapest.

  broadcast   one real step message (16 decoding requests, from a TP=2 run)
              sent from this process to a spawned rank, which acknowledges it
              over a pipe; round trips for a pipe, shared memory plus a pipe
              notice, and a torch.distributed (gloo) broadcast of the size and
              then of the packed bytes, against the bare acknowledgement
  steps       16 requests (128-token prompts, 64 output tokens, greedy) on a
              random-weight Llama at TP=1 and TP=2; per decode step: wall time,
              rank 0's time inside collectives (all-reduce and the logits
              gather, which includes waiting for the slower rank) and in
              sending the step

Every figure is the median over --repeats runs of the per-run median (the box
is shared and noisy).

    python -m bench.tp_overhead --repeats 5 --out bench/out/tp_overhead.json
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import git_commit, machine_info, now_utc, write_json

# SmolLM2-135M's width and vocabulary, with heads that split two ways.
SPEC = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=12,
            num_attention_heads=8, num_key_value_heads=4, head_dim=72, vocab_size=49152,
            max_position_embeddings=2048, tie_word_embeddings=True)
METHODS = ("ack", "pipe", "shm", "dist")
BATCH, PROMPT_LEN, OUTPUT_LEN = 16, 128, 64


def _echo(method: str, init_file: str, conn, shm_name: str, num_iters: int) -> None:
    """The receiving rank: take each message the `method` way, acknowledge it."""
    import torch
    import torch.distributed as dist

    from inference.parallel import group

    torch.set_num_threads(1)
    shm = SharedMemory(shm_name) if method == "shm" else None
    if method == "dist":
        group.init_group(1, 2, init_file, "cpu")
    for _ in range(num_iters):
        if method in ("ack", "pipe"):
            conn.recv_bytes()
        elif method == "shm":
            bytes(shm.buf[: int(conn.recv_bytes())])
        else:
            size = torch.empty(1, dtype=torch.int64)
            dist.broadcast(size, 0)
            payload = torch.empty(int(size), dtype=torch.uint8)
            dist.broadcast(payload, 0)
            payload.numpy().tobytes()
        conn.send_bytes(b"k")
    if shm is not None:
        shm.close()
    group.destroy_group()


def time_broadcast(method: str, message: bytes, num_iters: int) -> float:
    """Median round trip, µs."""
    import torch
    import torch.distributed as dist

    from inference.parallel import group

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    shm = SharedMemory(create=True, size=len(message))
    init_dir = tempfile.mkdtemp(prefix="tp-bench-")
    init_file = os.path.join(init_dir, "rendezvous")
    process = context.Process(target=_echo, args=(method, init_file, theirs, shm.name, num_iters))
    process.start()
    if method == "dist":
        group.init_group(0, 2, init_file, "cpu")
    times = []
    for _ in range(num_iters):
        start = time.perf_counter()
        if method == "ack":
            ours.send_bytes(b"x")
        elif method == "pipe":
            ours.send_bytes(message)
        elif method == "shm":
            shm.buf[: len(message)] = message
            ours.send_bytes(str(len(message)).encode())
        else:
            dist.broadcast(torch.tensor([len(message)]), 0)
            dist.broadcast(torch.frombuffer(bytearray(message), dtype=torch.uint8), 0)
        ours.recv_bytes()
        times.append(time.perf_counter() - start)
    process.join()
    group.destroy_group()
    shm.close()
    shm.unlink()
    return statistics.median(times[num_iters // 10:]) * 1e6


def time_steps(model: str, tensor_parallel_size: int, num_threads: int) -> tuple[dict[str, float], bytes]:
    """Median decode-step wall, collective and send time (ms), and one step message."""
    import torch

    from inference import LLM, SamplingParams
    from inference.parallel import group

    torch.set_num_threads(num_threads)
    spent = {"collectives": 0.0, "send": 0.0}

    def timed(fn, key):
        def wrapper(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapper

    originals = group.all_reduce, group.gather_vocab
    group.all_reduce = timed(group.all_reduce, "collectives")
    group.gather_vocab = timed(group.gather_vocab, "collectives")
    llm = LLM(model, max_model_len=256, max_num_seqs=BATCH, num_kv_blocks=BATCH * 16 + 16,
              tensor_parallel_size=tensor_parallel_size)
    messages: list[bytes] = []
    workers = llm.engine.runner.workers
    if workers is not None:
        send = workers.send
        workers.send = timed(lambda m: (messages.append(m), send(m))[1], "send")
    try:
        engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
        for i in range(BATCH):
            engine.add_request(str(i), [(i * 7 + j) % 1000 + 1 for j in range(PROMPT_LEN)], params)
        rows = []
        while engine.has_unfinished_requests():
            spent.update(collectives=0.0, send=0.0)
            start = time.perf_counter()
            engine.step()
            wall = time.perf_counter() - start
            if engine.scheduler.num_running == BATCH:  # a full decode step
                rows.append((wall, spent["collectives"], spent["send"]))
    finally:
        llm.shutdown()
        group.all_reduce, group.gather_vocab = originals
    columns = zip(*rows[2:])  # the first decode steps warm up
    names = ("step_ms", "collectives_ms", "send_ms")
    result = {name: statistics.median(col) * 1e3 for name, col in zip(names, columns)}
    return result, messages[len(messages) // 2] if messages else b""


def run(args: argparse.Namespace) -> dict:
    from bench.gpu_models import write_model

    import torch

    folder = Path(tempfile.mkdtemp(prefix="tp-bench-model-"))
    write_model(folder, SPEC, torch.float32, "cpu")
    configs = [("tp1_1thread", 1, 1), ("tp1_2threads", 1, 2), ("tp2_1thread_each", 2, 1)]
    steps: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    message = b""
    for _ in range(args.repeats):
        for name, tp, threads in configs:
            result, sent = time_steps(str(folder), tp, threads)
            steps[name].append(result)
            message = sent or message
    broadcast = {m: statistics.median(time_broadcast(m, message, args.iters) for _ in range(args.repeats))
                 for m in METHODS}
    return {
        "date": now_utc(), "commit": git_commit(), "machine": machine_info(), "model": SPEC,
        "batch": BATCH, "prompt_len": PROMPT_LEN, "output_len": OUTPUT_LEN, "repeats": args.repeats,
        "message_bytes": len(message), "broadcast_round_trip_us": broadcast,
        "steps": {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in steps.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=2000, help="round trips per broadcast measurement")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = run(args)
    print(f"step message: {report['message_bytes']} bytes")
    for method, us in report["broadcast_round_trip_us"].items():
        print(f"  {method:5s} round trip {us:8.1f} µs")
    for name, row in report["steps"].items():
        print(f"  {name:18s} " + "  ".join(f"{k} {v:7.2f}" for k, v in row.items()))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
