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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from inference.async_engine import AsyncLLM
from inference.request_stream import EngineDeadError
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


async def _finish_loading(state: ServerState) -> None:
    try:
        await state.engine.wait_ready()
    except EngineDeadError:
        logger.error("the model failed to load; /health answers 503")
        return
    from transformers import AutoTokenizer

    config = state.engine.config
    state.max_model_len = config.max_model_len
    tokenizer = await state.run_tokenizer(AutoTokenizer.from_pretrained, config.model)
    state.vocab_size = len(tokenizer)
    state.tokenizer = tokenizer  # last: a loaded tokenizer makes the server ready
    logger.info("model %s loaded (max_model_len %d); ready", state.settings.served_model_name, config.max_model_len)


def create_app(settings: ServerSettings, core_factory: Callable[[], EngineCore]) -> FastAPI:
    """`core_factory` builds the EngineCore; it is pickled to the core process."""
    state = ServerState(settings)
    metrics = EngineMetrics(state)
    console_stats = StatsHistory(metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine = AsyncLLM(core_factory, stats_logger=metrics.record)
        loading = asyncio.create_task(_finish_loading(state))
        sampling = asyncio.create_task(console_stats.run()) if settings.enable_console else None
        yield
        state.draining = True
        loading.cancel()
        if sampling is not None:
            sampling.cancel()
        await state.engine.shutdown()
        state.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

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
