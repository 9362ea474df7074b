"""Errors -> HTTP responses, in one place. Every HTTP error body has OpenAI's shape."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import GatewayError
from ..protocol import ErrorDetail, ErrorResponse


def error_response(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """A readable sentence from pydantic's error list, and the first field it names."""
    parts, param = [], None
    for item in err.errors():
        location = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        param = param or location or None
        parts.append(f"{location}: {item.get('msg')}" if location else str(item.get("msg")))
    return "; ".join(parts) or "invalid request", param


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, err: GatewayError) -> JSONResponse:
        return error_response(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(err)
        return error_response(400, message, "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "http_error")
