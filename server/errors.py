"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

Every failure the server reports goes through `error_response`, so clients
(and the official SDKs) can parse it whatever went wrong.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

logger = logging.getLogger(__name__)

# OpenAI's error types, by the status codes this server uses.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_type(status_code: int) -> str:
    """OpenAI's error type for a status code."""
    return ERROR_TYPES.get(status_code, "invalid_request_error" if status_code < 500 else "server_error")


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status_code), "param": param, "code": code}}


def error_response(
    status_code: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    # json.dumps' default ASCII escaping keeps lone surrogates from user input
    # (e.g. an unknown model name) encodable.
    body = json.dumps(error_body(status_code, message, param, code)).encode()
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


def bad_request(error: ValueError, known_params: Collection[str]) -> APIError:
    """400 for a ValueError from validation; such messages start with the parameter name."""
    message = str(error)
    first_word = message.split(" ", 1)[0]
    return APIError(400, message, param=first_word if first_word in known_params else None)


def _param_from_loc(loc: tuple) -> str | None:
    # pydantic adds union members to the location ("function-after[...]",
    # "list[int]"); they are not parameter names.
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or (isinstance(p, str) and p.isidentifier())]
    return ".".join(parts) or None


async def _api_error(_: Request, exc: APIError) -> Response:
    return error_response(exc.status_code, exc.message, param=exc.param, code=exc.code, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_from_loc(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return error_response(400, f"Request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return error_response(400, message, param=param)


async def _http_error(_: Request, exc: HTTPException) -> Response:
    # Starlette's own errors: unknown route, wrong method, unparsable body.
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"Internal server error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
