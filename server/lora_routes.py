"""Runtime LoRA adapter loading, as vLLM's API has it.

    POST /v1/load_lora_adapter    {"lora_name": .., "lora_path": ..}
    POST /v1/unload_lora_adapter  {"lora_name": ..}

Both answer 404 unless runtime updates are allowed (env
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or --allow-runtime-lora-updating),
as vLLM does not route them then. They sit under /v1/, so the API key
guards them. The front end only checks the JSON; the engine core reads and
checks the folder and answers 200, 400 (cannot be served, name taken), 404
(unknown name) or 409 (requests still use it).
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from inference.core_protocol import LoadLoRAAdapter, UnloadLoRAAdapter
from inference.request_stream import EngineDeadError
from server.errors import APIError
from server.protocol_base import Text, _Request
from server.state import ServerState

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
_ERROR_CODES = {400: "invalid_lora_adapter", 404: "lora_adapter_not_found", 409: "lora_adapter_in_use"}

lora_router = APIRouter()


def runtime_updating_from_env() -> bool:
    return os.environ.get(RUNTIME_UPDATING_ENV, "0").strip().lower() in ("1", "true")


class LoadLoRAAdapterRequest(_Request):
    lora_name: Text
    lora_path: Text


class UnloadLoRAAdapterRequest(_Request):
    lora_name: Text
    lora_int_id: int | None = None  # accepted as vLLM does; the name decides


async def _change(request: Request, command: LoadLoRAAdapter | UnloadLoRAAdapter) -> Response:
    state: ServerState = request.app.state.server
    if not state.settings.allow_runtime_lora_updating:
        raise APIError(404, "Not Found", code="not_found")
    engine = state.engine
    if engine is None or not engine.is_ready:
        raise APIError(503, "The model is still loading; retry shortly.", code="model_loading")
    if engine.config.lora is None:
        raise APIError(400, "LoRA is not enabled: start the server with --enable-lora.", code="lora_not_enabled")
    try:
        reply = await engine.change_lora(command)
    except EngineDeadError as exc:
        raise APIError(503, "The engine is not running.", code="engine_dead") from exc
    if reply.status != 200:
        raise APIError(reply.status, reply.message, param="lora_name" if reply.status != 400 else None,
                       code=_ERROR_CODES.get(reply.status))
    return PlainTextResponse(reply.message)


@lora_router.post("/v1/load_lora_adapter", summary="Load a PEFT LoRA adapter folder under a name")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    if not body.lora_name or not body.lora_path:
        raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
    if body.lora_name == request.app.state.server.settings.served_model_name:
        raise APIError(400, f"The lora adapter '{body.lora_name}' would hide the served model of that name.")
    return await _change(request, LoadLoRAAdapter(body.lora_name, body.lora_path))


@lora_router.post("/v1/unload_lora_adapter", summary="Unload a LoRA adapter no request uses any more")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    return await _change(request, UnloadLoRAAdapter(body.lora_name))
