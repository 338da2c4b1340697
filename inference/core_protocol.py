"""What the front end and the engine core say to each other.

Small flat dataclasses; `inference/core_codec.py` puts them on the wire as
msgpack. The core speaks in token ids only: text, stop strings and decoded
logprobs are the front end's work, so the core never waits on a tokenizer.
One `StepOutputs` per engine step carries every scheduled request's news and
the engine stats, so the cost of crossing the process boundary is paid once
per step, not once per token.

The same classes serve the in-process `LLMEngine`, which calls the core
directly and never encodes them, so the offline engine needs neither
msgspec nor ZeroMQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference.config import EngineConfig
from inference.sampling_params import SamplingParams
from inference.spec_decode.stats import SpecDecodeStats

LogprobEntry = tuple[float, int, list[int], list[float]]  # chosen lp, its rank, top ids, top lps


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    kv_cache_usage: float  # used blocks / total
    kv_waste_ratio: float  # allocated slots not holding a token / allocated slots
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_computed: int
    # Device memory held for good: every weight (all experts of an MoE model,
    # not just the active ones) and the KV cache, scratch block included.
    weight_bytes: int = 0
    kv_cache_bytes: int = 0
    # Per tensor-parallel rank, by rank: weights + KV cache on the CPU, all
    # that rank allocated on CUDA; one entry without tensor parallelism.
    rank_memory_bytes: list[int] = field(default_factory=list)
    num_kv_events_dropped: int = 0  # KV-cache events the publisher's full queue refused
    # LoRA adapter name -> its running / waiting requests (vLLM's iteration stats); empty without LoRA.
    running_lora_adapters: dict[str, int] = field(default_factory=dict)
    waiting_lora_adapters: dict[str, int] = field(default_factory=dict)
    # Speculative decoding's counters since start (vLLM's spec_decode_*); None when it is off.
    spec_decode: SpecDecodeStats | None = None

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Share of looked-up prompt tokens served from the prefix cache."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


def sample_request_id(request_id: str, index: int) -> str:
    """Core id of sample `index` of a caller's request; sample 0 keeps the id."""
    return request_id if index == 0 else f"{request_id}#{index}"


def check_request(token_ids: list[int], params: SamplingParams, config: EngineConfig, vocab_size: int) -> None:
    """Raise ValueError if the engine cannot run this prompt with these params.

    Callers run it before handing a request over, so bad input fails at the
    door, before anything streams."""
    max_len = config.max_model_len
    if not token_ids:
        raise ValueError("prompt is empty")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in token_ids):
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    if len(token_ids) >= max_len:
        raise ValueError(
            f"prompt has {len(token_ids)} tokens, max_model_len is {max_len}: no room left to generate a token"
        )
    if params.max_tokens is not None and len(token_ids) + params.max_tokens > max_len:
        raise ValueError(
            f"prompt has {len(token_ids)} tokens and max_tokens is {params.max_tokens}, "
            f"together over max_model_len {max_len}"
        )
    bad_ids = [t for t in [*(params.logit_bias or {}), *params.stop_token_ids] if t >= vocab_size]
    if bad_ids:
        raise ValueError(f"logit_bias and stop_token_ids must be token ids below {vocab_size}, got {bad_ids[0]}")
    if params.n > config.max_num_seqs:
        raise ValueError(f"n is {params.n}, over max_num_seqs {config.max_num_seqs}")
    if params.structured_outputs is not None and config.speculative is not None:
        # The drafts would have to pass the grammar token by token; not built.
        raise ValueError("structured_outputs cannot be combined with speculative decoding "
                         "(the engine runs with a speculative config)")


# ---- front end -> core -------------------------------------------------------


@dataclass(slots=True)
class AddRequest:
    request_id: str  # the caller's id; the core derives its samples' ids
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.monotonic(), one clock for both processes on Linux
    priority: int = 0
    cache_salt: str | None = None
    lora_name: str | None = None  # a registered LoRA adapter; None: the base model


@dataclass(slots=True)
class AbortRequests:
    request_ids: list[str]  # sample ids (see `sample_request_id`)


@dataclass(slots=True)
class Shutdown:
    pass


@dataclass(slots=True)
class SnapshotKV:
    """Ask for a `KVSnapshot`; the core answers between two steps."""


@dataclass(slots=True)
class ResetPrefixCache:
    """Forget every cached prefix, between two steps; a snapshot asked for
    after it sees the empty cache (one socket, in order)."""


@dataclass(slots=True)
class LoadLoRAAdapter:
    """Register a LoRA adapter folder; the core answers with a `LoRAAdapterReply`."""

    lora_name: str
    lora_path: str


@dataclass(slots=True)
class UnloadLoRAAdapter:
    """Forget a LoRA adapter; the core answers with a `LoRAAdapterReply`."""

    lora_name: str


CORE_INPUTS = (AddRequest, AbortRequests, Shutdown, SnapshotKV, ResetPrefixCache, LoadLoRAAdapter, UnloadLoRAAdapter)


# ---- core -> front end -------------------------------------------------------


@dataclass(slots=True)
class SampleOutput:
    """One scheduled sample's news from one step."""

    request_id: str  # the caller's id
    sample_index: int
    new_token_ids: list[int]  # empty for a prefill chunk that sampled nothing
    num_cached_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", "abort" or "grammar" (no token could continue it)
    stop_reason: int | None = None  # the stop token id, if one ended it
    logprobs: list[LogprobEntry] | None = None  # one per new token, when asked for
    prompt_logprobs: tuple[int, list[LogprobEntry]] | None = None  # (first position, entries) of this chunk
    # The sample's totals so far (see `Request`), for the request's trace span.
    num_preemptions: int = 0
    prefill_time: float = 0.0
    decode_time: float = 0.0


@dataclass(slots=True)
class StepOutputs:
    outputs: list[SampleOutput]
    scheduled_time: float  # when the step was scheduled: ends the queue time of new requests
    token_time: float  # when its tokens were sampled
    grammar_compiles: list[tuple[str, float]] = field(default_factory=list)  # (request id, seconds) compiled
    # Filled in by the core process only:
    stats: EngineStats | None = None
    num_adds: int = 0  # adds applied since the previous message; they leave the front end's queue count
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request id, error) of adds the core refused
    failed: list[str] = field(default_factory=list)  # request ids whose step failed; the core aborted them
    failure: str = ""  # why they failed


@dataclass(slots=True)
class CoreReady:
    """Sent once, after the model is loaded and the KV cache is sized."""

    config: EngineConfig
    vocab_size: int
    stats: EngineStats
    startup_seconds: dict[str, float]  # the core's start-up phases (inference/startup_phases.py)


@dataclass(slots=True)
class CoreFailed:
    """The core could not start or died; it exits right after."""

    error: str


@dataclass(slots=True)
class RequestBlocks:
    request_id: str  # the sample's id (see `sample_request_id`)
    block_table: list[int]
    num_computed_tokens: int
    lora_name: str | None = None  # the LoRA adapter it runs under


@dataclass(slots=True)
class KVSnapshot:
    """Every KV block's state at one instant between steps (see inference/kv_snapshot.py)."""

    block_size: int
    ref_cnts: list[int]  # by block id
    block_hashes: list[bytes | None]  # by block id; full hashes, cut short by the reader
    requests: list[RequestBlocks]  # those holding blocks
    stats: EngineStats


@dataclass(slots=True)
class LoRAAdapterReply:
    """How a load or unload went, as an HTTP status: 200 done, 400 the adapter
    cannot be served (or the name is taken), 404 unknown name, 409 still in use."""

    lora_name: str
    status: int
    message: str


CORE_OUTPUTS = (StepOutputs, CoreReady, CoreFailed, KVSnapshot, LoRAAdapterReply)
