"""What the routes share: settings from the command line and the live state
(engine, tokenizer, draining flag), kept on `app.state.server`."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from inference.async_engine import AsyncLLM
    from server.tracing import RequestTracer
    from inference.startup_phases import StartupPhases

T = TypeVar("T")


@dataclass(slots=True)
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_queued_requests: int = 256
    max_request_bytes: int = 4 * 1024 * 1024
    shutdown_timeout: float = 30.0
    log_prompts: bool = False
    metrics_compat: str = "none"  # "vllm": also export vLLM's metric names
    enable_console: bool = True  # the web console at / and its /debug/* data
    tracing: bool = False  # a trace span per completion request (server/tracing.py)
    otlp_traces_endpoint: str | None = None  # the flag's URL; None lets the SDK read OTEL_* variables
    model: str | None = None  # the model folder when known before the core loads it (its tokenizer loads meanwhile)
    started_at: float = field(default_factory=time.time)  # when `serve` started, for the start-up phases
    allow_runtime_lora_updating: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter


@dataclass(slots=True)
class ServerState:
    settings: ServerSettings
    engine: AsyncLLM | None = None
    # The server's own tokenizer instance: a Hugging Face fast tokenizer used
    # from two threads at once can fail with "Already borrowed", and the
    # engine's output processor uses its own on the event loop.
    tokenizer: PreTrainedTokenizerBase | None = None
    max_model_len: int = 0
    vocab_size: int = 0  # token ids the tokenizer knows: [0, vocab_size)
    draining: bool = False
    tracer: RequestTracer | None = None  # with tracing on
    startup: StartupPhases | None = None  # the start-up's phases, front end and core, once ready
    startup_total_s: float = 0.0  # from `serve` to ready
    started: int = field(default_factory=lambda: int(time.time()))
    # One thread for tokenizing and chat templates: long prompts stay off the
    # event loop, and the tokenizer is never used from two threads.
    tokenizer_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
    )

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None and self.engine is not None and self.engine.is_ready and not self.draining

    async def run_tokenizer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) on the tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_pool, functools.partial(fn, *args, **kwargs))
