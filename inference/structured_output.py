"""Grammar-constrained decoding with xgrammar: compile, cache, match, mask.

    check_structured_outputs(params)   the caller's check, before a request
                                       is handed over (no tokenizer needed)
    StructuredOutputManager.grammar()  a Future of the compiled grammar,
                                       compiled on a worker thread
    .matcher(compiled)                 one matcher per sample; the scheduler
                                       advances it with each sampled token
    fill_bitmask / apply_bitmask       the sampler's mask of allowed tokens

Invariants:
- A grammar is compiled once per (kind, spec text), against the engine's
  tokenizer, and kept in an LRU of `MAX_CACHED_GRAMMARS` entries; requests
  for a grammar still compiling share its Future.
- Compilation never runs on the engine thread: a slow schema delays only
  the requests that asked for it.
- JSON grammars allow no free whitespace between tokens: a small model given
  the choice can emit newlines until max_tokens and never close the object.
- The matcher's stop tokens are the engine's EOS ids, so the grammar ends
  exactly where the scheduler's EOS check ends the request.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xgrammar as xgr

from inference.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256
NUM_COMPILE_THREADS = 2


def _choice_ebnf(choices: list[str]) -> str:
    # JSON string escapes are valid EBNF string literals in xgrammar.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _grammar(kind: str, spec: str) -> xgr.Grammar:
    """The tokenizer-independent grammar; raises on a bad spec."""
    if kind == "json":
        return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(_choice_ebnf(json.loads(spec)))
    return xgr.Grammar.from_ebnf(spec)


def check_structured_outputs(params: StructuredOutputsParams) -> None:
    """Raise ValueError naming what is wrong if the spec cannot compile."""
    _check_spec(*params.key)


# Apps send the same few schemas again and again: a spec that passed once is
# not parsed again (a failing one raises, and lru_cache keeps no exceptions).
@functools.lru_cache(maxsize=MAX_CACHED_GRAMMARS)
def _check_spec(kind: str, spec: str) -> None:
    if kind == "json":
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("the JSON schema must be an object")
    try:
        _grammar(kind, spec)
    except Exception as exc:  # xgrammar raises RuntimeError / its own errors with a parser message
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        # Drop xgrammar's "[hh:mm:ss] file.cc:line: " prefix; the rest is the reason.
        raise ValueError(f"invalid {kind} for structured output: {message.rsplit(': ', 1)[-1]}") from None


@dataclass(slots=True)
class CompiledGrammar:
    grammar: xgr.CompiledGrammar
    compile_time: float  # seconds on the worker thread


class StructuredOutputManager:
    """Compiles and caches grammars for one tokenizer; makes matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size
        self.stop_token_ids = list(eos_token_ids)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids)
        # Our own LRU caches by spec; xgrammar's cache would keep a second copy.
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.executor = ThreadPoolExecutor(NUM_COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self.cache: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()

    def grammar(self, params: StructuredOutputsParams) -> tuple[Future[CompiledGrammar], bool]:
        """The compiled grammar's Future, and whether this call started its compile."""
        key = params.key
        future = self.cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self.cache.move_to_end(key)
            return future, False
        future = self.executor.submit(self._compile, *key)
        self.cache[key] = future
        if len(self.cache) > MAX_CACHED_GRAMMARS:
            self.cache.popitem(last=False)
        return future, True

    def _compile(self, kind: str, spec: str) -> CompiledGrammar:
        start = time.perf_counter()
        compiler = self.compiler
        if kind == "json":
            compiled = compiler.compile_json_schema(spec, any_whitespace=False)
        elif kind == "regex":
            compiled = compiler.compile_regex(spec)
        else:
            compiled = compiler.compile_grammar(_grammar(kind, spec))
        elapsed = time.perf_counter() - start
        logger.info("compiled a %s grammar in %.1f ms", kind, elapsed * 1e3)
        return CompiledGrammar(compiled, elapsed)

    def matcher(self, compiled: CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled.grammar, override_stop_tokens=self.stop_token_ids)


def fill_bitmask(matchers: dict[int, xgr.GrammarMatcher], num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab / 32)] int32 on the host: bit t of row i is set
    if row i may sample token t next; rows without a matcher allow all."""
    bitmask = xgr.allocate_token_bitmask(num_rows, vocab_size)
    for row, matcher in matchers.items():
        matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of `rows` that their bitmask row
    forbids; other rows are not touched. On CUDA xgrammar's kernel runs on
    the device after one non-blocking copy of the bitmask."""
    if logits.device.type == "cuda":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=rows)
