"""The web console: the page at `/` and its data under `/debug/`.

    GET /                  the console (server/static/index.html), no build step, no CDN
    GET /static/...        its script, style sheet and screenshot
    GET /debug/kv          one KV-cache snapshot as JSON (format: inference/kv_snapshot.py)
    GET /debug/kv/stream   the same, as server-sent events, at most 4 a second
    GET /debug/stats       the metrics panel's history (server/console_stats.py)

With --api-key, `/debug/` needs the key like `/v1/` (server/middleware.py);
the page itself is open and asks for the key. `--disable-console` leaves
this router and the static files out, so they answer 404.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from inference.async_engine import AsyncLLM
from inference.request_stream import EngineDeadError
from inference.core_protocol import KVSnapshot
from inference.kv_snapshot import kv_snapshot_json
from server.errors import APIError
from server.serving_common import sse

STATIC_DIR = Path(__file__).resolve().parent / "static"
MIN_UPDATE_INTERVAL_S = 0.25  # at most 4 map updates a second per viewer

console_router = APIRouter(include_in_schema=False)


def _engine(request: Request) -> AsyncLLM:
    engine = request.app.state.server.engine
    if engine is None or not engine.is_ready:
        raise APIError(503, "The model is still loading; retry shortly.", code="model_loading",
                       headers={"Retry-After": "5"})
    return engine


def _snapshot_json(snapshot: KVSnapshot) -> dict[str, Any]:
    return {"time": time.time(), **kv_snapshot_json(snapshot)}


@console_router.get("/")
async def console_page() -> Response:
    return FileResponse(STATIC_DIR / "index.html")


@console_router.get("/debug/kv")
async def kv_blocks(request: Request) -> JSONResponse:
    try:
        snapshot = await _engine(request).kv_snapshot()
    except EngineDeadError as exc:
        raise APIError(503, f"The engine is not running: {exc}", code="engine_dead") from exc
    return JSONResponse(_snapshot_json(snapshot))


@console_router.get("/debug/kv/stream")
async def kv_blocks_stream(request: Request) -> StreamingResponse:
    engine = _engine(request)

    async def snapshots() -> AsyncIterator[dict[str, Any]]:
        # Ends when the client goes (Starlette cancels it) or the engine dies
        # (sse() turns that into an error event).
        next_update = time.monotonic()
        while True:
            await asyncio.sleep(max(0.0, next_update - time.monotonic()))
            snapshot = await engine.kv_snapshot()  # fresh: taken after the wait
            next_update = time.monotonic() + MIN_UPDATE_INTERVAL_S
            yield _snapshot_json(snapshot)

    return StreamingResponse(sse(snapshots()), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@console_router.get("/debug/stats")
async def stats_history(request: Request) -> JSONResponse:
    return JSONResponse(request.app.state.console_stats.as_json())
