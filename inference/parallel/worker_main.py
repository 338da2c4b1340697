"""The process of one tensor-parallel rank other than 0.

It joins the group, loads its shard of the model and its KV cache (the
same block count as every rank), then runs each step rank 0 sends: the
block copies, the forward and the logits gathers, in lockstep with the
others. It never samples. It ignores SIGINT and SIGTERM as the engine core
does (they reach the whole process group; rank 0 decides when to stop),
exits on an empty message or when its parent is gone, and on any error sends
rank 0 the error and exits non-zero.
"""

from __future__ import annotations

import logging
import os
import signal
from multiprocessing.connection import Connection

from inference.config import EngineConfig

logger = logging.getLogger(__name__)

PARENT_CHECK_S = 1.0  # how often an idle rank looks for its parent


def run_worker(config: EngineConfig, rank: int, init_file: str, steps: Connection, errors: Connection,
               parent_pid: int, num_threads: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s")
    import torch
    from transformers import AutoConfig

    from inference.model_runner import ModelRunner
    from inference.parallel import group
    from inference.parallel.step_message import decode_step

    torch.set_num_threads(num_threads)  # as many as rank 0 uses
    try:
        group.init_group(rank, config.tensor_parallel_size, init_file, config.device)
        runner = ModelRunner(config, AutoConfig.from_pretrained(config.model))
        while True:
            if not steps.poll(PARENT_CHECK_S):
                if os.getppid() != parent_pid:
                    logger.error("rank 0 is gone; exiting")
                    return
                continue
            message = steps.recv_bytes()
            if not message:
                return
            runner.run_step(decode_step(runner.buffers, message))
    except EOFError:
        return  # rank 0 closed the pipe
    except BaseException as exc:  # noqa: BLE001 - rank 0 must hear why
        logger.exception("tensor-parallel rank %d failed", rank)
        try:
            errors.send(repr(exc))
        except OSError:
            pass  # rank 0 is gone too
        raise SystemExit(1) from exc
    finally:
        group.destroy_group()
