"""Errors -> each transport's explicit error, in one place.

* HTTP before the first byte: OpenAI's error shape with the error's status
  (:func:`error_response`, and the app's exception handlers, :func:`install`);
* HTTP after the first byte: the response is aborted (``StreamAborted``; the body
  ends without its chunked terminator);
* SSE: an ``error`` event (:func:`sse_error_event`);
* WebSocket: an ``error`` frame, the connection kept (:func:`ws_error_frame`).

Anything that is not a ``GatewayError`` is logged with its traceback and becomes an
``InternalError`` (500) first (:func:`as_gateway_error`).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from decoder_gateway.api.openai_protocol import SpeechStreamError
from decoder_gateway.api.protocol import ErrorDetail, ErrorMessage, ErrorResponse
from decoder_gateway.errors import GatewayError, InternalError

logger = logging.getLogger(__name__)

_JSON_BODY_ERRORS = {"model_attributes_type", "dict_type", "json_invalid", "model_type"}


def as_gateway_error(err: BaseException) -> GatewayError:
    if isinstance(err, GatewayError):
        return err
    logger.error("unexpected error", exc_info=err)
    return InternalError(f"internal error: {type(err).__name__}")


def error_detail(err: GatewayError) -> ErrorDetail:
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return ErrorDetail(message=err.message, type=kind, param=err.param, code=err.code)


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def gateway_error_response(err: BaseException) -> JSONResponse:
    typed = as_gateway_error(err)
    return error_response(typed.status, typed.message, typed.code, typed.param, typed.retry_after)


def ws_error_frame(err: BaseException, segment_id: str | int | None = None) -> ErrorMessage:
    typed = as_gateway_error(err)
    return ErrorMessage(
        message=typed.message,
        code=typed.code,
        segment_id=segment_id,
        retry_after=typed.retry_after,
    )


def sse_error_event(err: BaseException) -> dict[str, str]:
    detail = error_detail(as_gateway_error(err))
    return {"data": SpeechStreamError(error=detail).model_dump_json()}


def validation_message(err: RequestValidationError, content_type: str) -> tuple[str, str | None]:
    """A readable sentence from pydantic's error list, and the first field it names."""
    errors = err.errors()
    if not content_type.startswith("application/json") and any(
        tuple(e.get("loc", ())) == ("body",) and e.get("type") in _JSON_BODY_ERRORS for e in errors
    ):
        shown = content_type or "none"
        return (
            "the body must be a JSON object sent with 'Content-Type: application/json' "
            f"(Content-Type was {shown})",
            None,
        )
    parts, param = [], None
    for item in errors:
        location = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        param = param or location or None
        parts.append(f"{location}: {item.get('msg')}" if location else str(item.get("msg")))
    return "; ".join(parts) or "invalid request", param


def install(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, err: GatewayError) -> JSONResponse:
        return gateway_error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "").lower()
        message, param = validation_message(err, content_type)
        return error_response(400, message, "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), "http_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        # Starlette re-raises it after this response (unused once the response has
        # started), and uvicorn logs it: no logging here.
        typed = InternalError(f"internal error: {type(err).__name__}")
        return error_response(typed.status, typed.message, typed.code)
