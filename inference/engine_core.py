"""The engine core: one `step()` is schedule -> run -> update.

    scheduler.schedule()      which requests, how many tokens each
    runner.execute(...)       one forward pass, sampled token ids
    scheduler.update(...)     computed counts, new tokens, token-level stops

With speculative decoding on, the runner also returns each request's
next draft tokens and the scheduler's update takes them; a step may then
emit several tokens for one request (`inference/spec_decode/`).

A structured-output request first waits for its grammar, compiled on a
worker thread (`inference/structured_output.py`); the step that finds it
compiled hands the scheduler one matcher per sample.

It deals in token ids only and hands back one flat `StepOutputs` per step;
text, stop strings and decoded logprobs belong to the `OutputProcessor` on
the caller's side. That keeps the core free to run in its own process
(`inference/core_process.py`) with nothing between two steps but the model.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait

from transformers import AutoConfig, AutoTokenizer

from inference.block_manager import BlockManager
from inference.config import EngineConfig
from inference.core_protocol import (
    AddRequest, EngineStats, KVSnapshot, LoadLoRAAdapter, LoRAAdapterReply, SampleOutput, StepOutputs,
    UnloadLoRAAdapter, check_request, sample_request_id,
)
from inference.core_startup import eos_token_ids, memory_plan, start_runner
from inference.kv_snapshot import take_kv_snapshot
from inference.request import Request, RequestStatus
from inference.scheduler import Scheduler
from inference.startup_phases import StartupPhases

logger = logging.getLogger(__name__)

# With nothing else to run, a step waits this long for a grammar to compile
# instead of spinning (the core process still hears new requests after it).
GRAMMAR_WAIT_S = 0.05


class StepError(RuntimeError):
    """The forward pass failed; the requests in that step were aborted, the
    engine itself is still usable."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids


def _count_loras(requests: list[Request]) -> dict[str, int]:
    """Requests (samples included) per LoRA adapter, in first-seen order."""
    counts: dict[str, int] = {}
    for request in requests:
        if request.lora_name is not None:
            counts[request.lora_name] = counts.get(request.lora_name, 0) + request.num_seats
    return counts


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        logger.info("%s", config.describe_dtype())
        self.startup = StartupPhases()
        with self.startup.phase("config"):
            self.hf_config = AutoConfig.from_pretrained(config.model)
        self.vocab_size = self.hf_config.vocab_size
        with self.startup.phase("tokenizer"):
            self.eos_token_ids = eos_token_ids(config.model)
        planned = memory_plan(config, self.hf_config)
        self.runner = start_runner(config, self.hf_config)
        if planned is not None:
            runner = self.runner
            logger.info("memory plan: weights %d bytes per rank planned, %d measured; KV blocks %d planned, %d "
                        "measured (%d bytes per rank with the scratch block)", planned.weight_bytes,
                        runner.weight_bytes, planned.num_blocks, runner.num_blocks, runner.kv_cache_bytes)
        for name, seconds in self.runner.startup.seconds.items():
            self.startup.add(name, seconds)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
            record_events=config.kv_events is not None,
        )
        self.scheduler = Scheduler(config.scheduler_config(), self.block_manager)
        if config.lora is not None:
            for module in config.lora.modules:
                self.add_lora(module.name, module.path)
        self.kv_events = None
        if config.kv_events is not None:
            # Imported only when asked for: the offline engine needs neither ZeroMQ nor msgspec.
            from inference.kv_events_publisher import KVEventPublisher

            self.kv_events = KVEventPublisher(config.kv_events, config.block_size)
        # leader request id -> (its grammar's Future, whether its add started the compile)
        self.compiling: dict[str, tuple[Future, bool]] = {}
        self.grammar_compiles: list[tuple[str, float]] = []  # (request id, seconds) since the last step

    @functools.cached_property
    def structured_output(self):
        """Built on the first structured request: free-text serving never pays for it."""
        from inference.structured_output import StructuredOutputManager

        tokenizer = AutoTokenizer.from_pretrained(self.config.model)
        return StructuredOutputManager(tokenizer, self.vocab_size, self.eos_token_ids)

    def add_request(self, add: AddRequest) -> None:
        params = add.params
        check_request(add.prompt_token_ids, params, self.config, self.vocab_size)
        if add.request_id in self.scheduler.requests:
            raise ValueError(f"request id {add.request_id!r} is already in use")
        lora_id = None
        if add.lora_name is not None:
            if self.runner.lora is None or add.lora_name not in self.runner.lora.registered:
                raise ValueError(f"The model `{add.lora_name}` does not exist.")
            lora_id = self.runner.lora.registered[add.lora_name].lora_id

        # A structured request waits for its grammar before it may queue.
        status = RequestStatus.WAITING if params.structured_outputs is None else RequestStatus.WAITING_FOR_GRAMMAR

        def sample(index: int) -> Request:
            return Request(
                sample_request_id(add.request_id, index), add.request_id, index, add.prompt_token_ids, params,
                self.eos_token_ids, add.arrival_time, add.priority, add.cache_salt, add.lora_name, lora_id,
                status=status,
            )

        leader = sample(0)
        leader.pending_samples = [sample(i) for i in range(1, params.n)]
        if params.structured_outputs is not None:
            self.compiling[add.request_id] = self.structured_output.grammar(params.structured_outputs)
        self.scheduler.add_request(leader)

    def add_lora(self, name: str, path: str) -> int:
        """Register a LoRA adapter (read and checked now: LoRAError if it cannot
        be served, or the name is taken); its lora_id."""
        if self.runner.lora is None:
            raise ValueError("LoRA is not enabled (start with enable_lora)")
        return self.runner.lora.register(name, path).lora_id

    def remove_lora(self, name: str) -> None:
        """Forget a LoRA adapter: KeyError if unknown, LoRAInUseError while requests still use it."""
        from inference.lora.residency import LoRAInUseError

        if self.runner.lora is None or name not in self.runner.lora.registered:
            raise KeyError(name)
        num_using = sum(r.lora_name == name for r in self.scheduler.requests.values())
        if num_using:
            raise LoRAInUseError(f"The lora adapter '{name}' is still used by {num_using} request(s).")
        self.runner.lora.unregister(name)

    def change_lora(self, command: LoadLoRAAdapter | UnloadLoRAAdapter) -> LoRAAdapterReply:
        """Apply a runtime load or unload; bad input is answered, never raised."""
        from inference.lora.residency import LoRAInUseError

        name = command.lora_name
        try:
            if isinstance(command, LoadLoRAAdapter):
                self.add_lora(name, command.lora_path)
                return LoRAAdapterReply(name, 200, f"Success: LoRA adapter '{name}' added successfully.")
            self.remove_lora(name)
            return LoRAAdapterReply(name, 200, f"Success: LoRA adapter '{name}' removed successfully.")
        except KeyError:
            return LoRAAdapterReply(name, 404, f"The lora adapter '{name}' cannot be found.")
        except LoRAInUseError as exc:
            return LoRAAdapterReply(name, 409, str(exc))
        except ValueError as exc:
            return LoRAAdapterReply(name, 400, str(exc))

    def _admit_compiled(self) -> list[SampleOutput]:
        """Queue the requests whose grammar compiled; a failed compile ends
        its request as aborted (callers check specs first, so this is rare).
        Returns the outputs of requests ended here."""
        if not self.compiling:
            return []
        if not self.scheduler.has_schedulable:
            wait([f for f, _ in self.compiling.values()], timeout=GRAMMAR_WAIT_S, return_when=FIRST_COMPLETED)
        ended = []
        for request_id, (future, is_new) in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[request_id]
            leader = self.scheduler.waiting_for_grammar.get(request_id)
            if leader is None:
                continue  # aborted while compiling
            if future.exception() is not None:
                logger.error("grammar compile failed for %s: %s", request_id, future.exception())
                ended += [SampleOutput(request_id, r.sample_index, [], finish_reason="abort")
                          for r in [leader, *leader.pending_samples]]
                self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
                continue
            compiled = future.result()
            if is_new:
                self.grammar_compiles.append((request_id, compiled.compile_time))
            self.scheduler.grammar_ready(request_id, functools.partial(self.structured_output.matcher, compiled))
        return ended

    def abort_requests(self, sample_ids: list[str]) -> None:
        """Finish these samples and free their blocks; unknown ids (already
        finished) are ignored, so aborts may race with normal finishes."""
        for sample_id in sample_ids:
            self.scheduler.finish_request(sample_id, RequestStatus.FINISHED_ABORTED)

    def abort_all(self) -> list[str]:
        """Abort every request; returns the caller ids it held."""
        held = self.scheduler.requests
        request_ids = list(dict.fromkeys(r.parent_id for r in held.values()))
        self.abort_requests(list(held))
        return request_ids

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> StepOutputs:
        outputs = self._admit_compiled()
        sched = self.scheduler.schedule()
        scheduled_at = time.monotonic()  # queue time ends here, before the forward pass
        prefilling = [request.is_prefilling for request, _ in sched.scheduled]  # before update moves them on
        try:
            result = self.runner.execute(sched)
        except Exception as exc:
            parent_ids = list(dict.fromkeys(r.parent_id for r, _ in sched.scheduled))
            failed = set(parent_ids)
            self.abort_requests([rid for rid, r in self.scheduler.requests.items() if r.parent_id in failed])
            raise StepError(parent_ids, exc) from exc
        now = time.monotonic()
        logprobs = dict(zip(result.request_ids, result.logprobs))
        appended = self.scheduler.update(sched, dict(zip(result.request_ids, result.token_ids)), result.draft_token_ids)
        for (request, _), is_prefill in zip(sched.scheduled, prefilling):
            if is_prefill:
                request.prefill_time += now - scheduled_at
            else:
                request.decode_time += now - scheduled_at
            rid = request.request_id
            # Tokens past a stop, or one the grammar refused, were not appended: they are dropped.
            token_ids = appended.get(rid, [])
            entries = logprobs.get(rid)
            status = request.status
            outputs.append(SampleOutput(
                request.parent_id, request.sample_index, token_ids,
                num_cached_tokens=request.num_cached_tokens,
                finish_reason=status.value if status.finished else None,
                stop_reason=request.stop_reason if status.finished else None,
                logprobs=entries[: len(token_ids)] if entries is not None else None,
                prompt_logprobs=result.prompt_logprobs.get(rid),
                num_preemptions=request.num_preemptions,
                prefill_time=request.prefill_time,
                decode_time=request.decode_time,
            ))
        compiles, self.grammar_compiles = self.grammar_compiles, []
        self._publish_kv_events()
        return StepOutputs(outputs, scheduled_at, now, grammar_compiles=compiles)

    def _publish_kv_events(self) -> None:
        if self.kv_events is not None:
            self.kv_events.publish(self.block_manager.take_events())

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their data, and
        re-register as their requests go on); subscribers hear AllBlocksCleared."""
        self.block_manager.reset_prefix_cache()
        self._publish_kv_events()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        allocated = filled = 0
        for request in self.scheduler.running:
            allocated += len(request.block_table) * bm.block_size
            filled += request.num_computed_tokens
        total = bm.num_blocks
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_total_blocks=total,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.num_used_blocks / total,
            kv_waste_ratio=(allocated - filled) / allocated if allocated else 0.0,
            num_preemptions=self.scheduler.stats.num_preemptions,
            prefix_cache_queries=self.scheduler.stats.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.stats.prefix_cache_hits,
            prompt_tokens_computed=self.scheduler.stats.prompt_tokens_computed,
            weight_bytes=self.runner.weight_bytes,
            kv_cache_bytes=self.runner.kv_cache_bytes,
            rank_memory_bytes=self.runner.rank_memory_bytes,
            num_kv_events_dropped=self.kv_events.num_dropped_events if self.kv_events is not None else 0,
            spec_decode=copy.deepcopy(self.scheduler.stats.spec_decode) if self.config.speculative else None,
            **self._lora_counts(),
        )

    def _lora_counts(self) -> dict[str, dict[str, int]]:
        """Requests per adapter, running and waiting; nothing (and no walk over the queue) without LoRA:
        stats() runs after every step."""
        if self.config.lora is None:
            return {}
        waiting = [e.request for e in self.scheduler.waiting] + list(self.scheduler.waiting_for_grammar.values())
        return {"running_lora_adapters": _count_loras(self.scheduler.running),
                "waiting_lora_adapters": _count_loras(waiting)}

    def kv_snapshot(self) -> KVSnapshot:
        """The KV cache's blocks and their holders; call it between steps."""
        return take_kv_snapshot(self.block_manager, self.scheduler.requests.values(), self.stats())

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks and the event publisher, if any; the core is unusable after."""
        if self.kv_events is not None:
            self.kv_events.shutdown()
        self.runner.shutdown()
