"""The FastAPI application: routes, error shapes, middleware, and start-up.

This process is the front end: HTTP, tokenization, chat templates,
detokenization, stop strings, SSE and metrics. The engine core runs in its
own process (see inference/async_engine.py), so the model never waits on
the server. The app starts serving before the model is loaded: /ready
answers 503 until the core reports it is loaded, and /health reports
whether the core process is alive.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from inference.async_engine import AsyncLLM
from inference.core_spawn import SpawnedCore, load_tokenizer
from inference.request_stream import EngineDeadError
from inference.startup_phases import StartupPhases
from server.console_routes import STATIC_DIR, console_router
from server.console_stats import StatsHistory
from server.errors import install_error_handlers
from server.metrics import EngineMetrics
from server.middleware import ApiKeyAuth, BodySizeLimit
from server.lora_routes import lora_router
from server.routes import router
from server.state import ServerSettings, ServerState

if TYPE_CHECKING:
    from inference.engine_core import EngineCore

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def _finish_loading(state: ServerState, imports_s: float) -> None:
    try:
        await _load(state, imports_s)
    except Exception:  # the task's error would otherwise go unseen, with /ready at 503 for good
        logger.exception("the front end failed to finish loading; /ready stays 503")


async def _load(state: ServerState, imports_s: float) -> None:
    settings = state.settings
    # Loaded while the core loads the model, when the folder is known already
    # (not for a default model the core may still have to prepare).
    early = asyncio.ensure_future(state.run_tokenizer(_timed, load_tokenizer, settings.model)) if settings.model else None
    try:
        await state.engine.wait_ready()
    except EngineDeadError:
        logger.error("the model failed to load; /health answers 503")
        return
    config = state.engine.config
    state.max_model_len = config.max_model_len
    tokenizer, tokenizer_s = await (early or state.run_tokenizer(_timed, load_tokenizer, config.model))
    state.vocab_size = len(tokenizer)
    state.startup = StartupPhases(dict(state.engine.startup_seconds))
    state.startup.add("frontend_imports", imports_s)
    state.startup.add("frontend_tokenizer", tokenizer_s)
    state.startup_total_s = time.time() - settings.started_at
    state.tokenizer = tokenizer  # last: a loaded tokenizer makes the server ready
    logger.info("model %s loaded (max_model_len %d); ready", settings.served_model_name, config.max_model_len)
    logger.info("%s", state.startup.describe(state.startup_total_s, state.engine.stats().weight_bytes))


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def create_app(settings: ServerSettings, core: SpawnedCore | Callable[[], EngineCore]) -> FastAPI:
    """`core`: the engine-core process, started already (`spawn_core`), or
    the factory that builds the EngineCore in one, pickled to it."""
    imports_s = time.time() - settings.started_at  # the server stack's imports, flags and checks
    state = ServerState(settings)
    metrics = EngineMetrics(state)
    if settings.tracing:
        from server.tracing import RequestTracer  # only now: tracing off loads no OpenTelemetry SDK

        state.tracer = RequestTracer(settings.otlp_traces_endpoint, settings.served_model_name, metrics.trace_ids)
        metrics.registry.register(state.tracer)
    console_stats = StatsHistory(metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine = AsyncLLM(core, stats_logger=metrics.record, tokenizer_folder=settings.model)
        loading = asyncio.create_task(_finish_loading(state, imports_s))
        sampling = asyncio.create_task(console_stats.run()) if settings.enable_console else None
        yield
        state.draining = True
        loading.cancel()
        if sampling is not None:
            sampling.cancel()
        await state.engine.shutdown()
        state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        if state.tracer is not None:
            await asyncio.to_thread(state.tracer.shutdown)  # the last spans, without blocking the loop

    app = FastAPI(
        title="pagedinfer",
        description="OpenAI-compatible API of a readable LLM inference server.",
        version=importlib.metadata.version("pagedinfer"),
        lifespan=lifespan,
    )
    app.state.server = state
    app.state.metrics_registry = metrics.registry
    app.include_router(router)
    app.include_router(lora_router)
    if settings.enable_console:
        app.state.console_stats = console_stats
        app.include_router(console_router)
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_error_handlers(app)
    # The last middleware added runs first: the key is checked before a large body is read.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    return app
