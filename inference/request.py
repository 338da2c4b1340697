"""One request (one sample of a prompt) as the scheduler tracks it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from inference.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # its grammar compiles; it holds no batch slot
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_GRAMMAR = "grammar"  # the grammar allowed no token the sampler could take

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "grammar")


@dataclass(slots=True, eq=False)
class Request:
    request_id: str  # unique per sample: the parent id, or "<parent>#<index>"
    parent_id: str  # the id the caller knows
    sample_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...]
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    lora_name: str | None = None  # the LoRA adapter it runs with; None: the base model
    lora_id: int | None = None  # that adapter's id (KV events name both)
    # prompt followed by outputs; grows by one per sampled token
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # Seconds of the forward passes that ran this sample, split by phase: a
    # pass that still computes its prompt (or recomputes it after a
    # preemption) is prefill, one that extends a sampled output is decode.
    prefill_time: float = 0.0
    decode_time: float = 0.0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    stop_reason: int | None = None
    # n > 1: the leader prefills the shared prompt once, then the scheduler
    # forks these held-back samples off its blocks.
    pending_samples: list[Request] = field(default_factory=list)
    # An xgrammar GrammarMatcher for structured output (or anything with its
    # accept_token / is_terminated); None for free text.
    grammar: Any = None
    # Speculative decoding: the guesses the next step verifies after the last
    # token (the scheduler sets them from the runner's proposal), and this
    # sample's totals, which switch it off when its guesses are mostly wrong.
    spec_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    spec_off: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_prefilling(self) -> bool:
        """Whether its next pass computes prompt tokens rather than decoding one token."""
        return self.num_output_tokens == 0 or self.num_computed_tokens < self.num_tokens - 1

    @property
    def num_tokens_target(self) -> int:
        """Tokens to compute before the next sample; a leader with samples to
        fork stops one short, so each sample computes the last prompt token
        itself and draws its own first token."""
        return self.num_tokens - 1 if self.pending_samples else self.num_tokens

    @property
    def num_seats(self) -> int:
        """Batch slots held: a leader reserves one for each pending sample."""
        return 1 + len(self.pending_samples)

    @property
    def sort_key(self) -> tuple[int, float, str]:
        return (self.priority, self.arrival_time, self.request_id)
