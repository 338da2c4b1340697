"""What the engine core does once, at start-up, before its first step.

    eos_token_ids(folder)       the ids that end a request: the generation
                                config's and the tokenizer's
    memory_plan(config, ...)    `pagedinfer plan`'s numbers, before loading;
                                a model the GPU cannot hold stops here
    start_runner(config, ...)   rank 0's model runner, with the other
                                tensor-parallel ranks started first, on
                                the engine's thread count

Invariants: each runs once per engine; a failure says why in one message
(the plan's shortfall, or a tensor-parallel rank's own error rather than the
collective that failed after it).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, GenerationConfig

from inference.config import EngineConfig
from inference.cpu_threads import choose_num_threads
from inference.memory_plan import MemoryPlan, plan, weight_bytes
from inference.model_runner import ModelRunner
from inference.parallel.workers import FAILURE_REPORT_S, TensorParallelWorkers

logger = logging.getLogger(__name__)


def _tokenizer_eos_id(folder: str) -> int | None:
    """The tokenizer's EOS id, from its tokenizer.json by the `tokenizers`
    library when the folder has one (0.05 s), else by AutoTokenizer (0.5 s
    of every start-up, spent only to learn one id)."""
    path = Path(folder)
    try:
        eos = json.loads((path / "tokenizer_config.json").read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and (path / "tokenizer.json").is_file():
            found = Tokenizer.from_file(str(path / "tokenizer.json")).token_to_id(eos)
            if found is not None:
                return found
    except (OSError, ValueError):
        pass
    return AutoTokenizer.from_pretrained(folder).eos_token_id


def eos_token_ids(folder: str) -> tuple[int, ...]:
    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:
        eos = None
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    tokenizer_eos = _tokenizer_eos_id(folder)
    if tokenizer_eos is not None:
        ids.add(tokenizer_eos)
    return tuple(sorted(ids))


def memory_plan(config: EngineConfig, hf_config) -> MemoryPlan | None:
    """The plan `pagedinfer plan` prints, made before loading: a model whose
    weights alone exceed the GPU's share stops here, saying by how much, not
    with an out-of-memory error halfway through loading. None where the plan
    cannot be made (its activation estimate is above a budget the engine
    will measure for itself)."""
    device_memory = torch.cuda.mem_get_info()[1] if config.device == "cuda" else None
    try:
        return plan(hf_config, dtype=config.dtype, device=config.device, block_size=config.block_size,
                    max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
                    max_num_batched_tokens=config.max_num_batched_tokens,
                    tensor_parallel_size=config.tensor_parallel_size, num_kv_blocks=config.num_kv_blocks,
                    kv_cache_memory=config.kv_cache_memory, device_memory=device_memory,
                    gpu_memory_utilization=config.gpu_memory_utilization or 1.0)
    except ValueError as exc:
        weights = weight_bytes(hf_config, getattr(torch, config.dtype), config.device, config.tensor_parallel_size)
        if device_memory is not None and weights > device_memory * (config.gpu_memory_utilization or 1.0):
            raise ValueError(f"memory plan: {exc}") from None
        logger.warning("memory plan: %s", exc)
        return None


def start_runner(config: EngineConfig, hf_config) -> ModelRunner:
    """Rank 0's runner, on the engine's thread count (`engine_threads`: set
    first, so tensor-parallel ranks take it; or measured on the loaded model)."""
    if isinstance(config.engine_threads, int):
        torch.set_num_threads(config.engine_threads)
    runner = _start_ranks(config, hf_config)
    if config.engine_threads == "auto":
        with runner.startup.phase("cpu_threads"):
            # A decode-shaped step of 16 requests: what serving repeats.
            choose_num_threads(functools.partial(runner.profile_forward, 16, 16), torch.get_num_threads())
    return runner


def _start_ranks(config: EngineConfig, hf_config) -> ModelRunner:
    """Rank 0's runner, with ranks 1..N-1 started and joined first under tensor parallelism."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, hf_config)
    workers = TensorParallelWorkers(config)
    try:
        return ModelRunner(config, hf_config, workers)
    except BaseException as exc:
        # A rank's own error says more than the collective that failed after it.
        failure = workers.wait_failure(FAILURE_REPORT_S)
        workers.stop()
        if failure is None:
            raise
        raise RuntimeError(failure) from exc
