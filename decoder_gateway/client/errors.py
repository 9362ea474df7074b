"""The client's failures: one class per case a caller handles differently.

Every failure is a :class:`ClientError` whose text is fit for a user (the server's own
message where it sent one), so a command line can print it as it is; the subclasses
and their attributes are for programs that tell the cases apart, such as the load and
fault run, which counts a refused connection, an error answer and a cut-off stream
differently.
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class ClientError(Exception):
    """A request that failed; the text says how."""


class ConnectFailed(ClientError):
    """No connection: refused, unreachable, or the WebSocket handshake broke off."""


class ReplyTimeout(ClientError):
    """The server sent nothing for the client's timeout."""


class ServerError(ClientError):
    """The server answered with an error: an HTTP error status or a WebSocket error frame.

    ``status``: the HTTP status (None for an error frame); ``code`` and ``param``: those
    of the gateway's error object, where it sent one; ``body``: the raw HTTP body;
    ``retry_after``: the seconds the server asks to wait before retrying (its
    ``Retry-After`` header, or an error frame's ``retry_after``), where it says.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        body: bytes = b"",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.body = body
        self.retry_after = retry_after

    @classmethod
    def from_http(
        cls, status: int, reason: str, body: bytes, retry_after: str | None = None
    ) -> ServerError:
        """The error of an HTTP answer with an error status (``{"error": {...}}`` or text)."""
        error = error_object(body) or {}
        code, param = error.get("code"), error.get("param")
        return cls(
            f"server error: {error_message(body, reason)} (HTTP {status})",
            status=status,
            code=None if code is None else str(code),
            param=None if param is None else str(param),
            body=body,
            retry_after=seconds(retry_after),
        )

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServerError:
        return cls.from_http(
            response.status_code,
            response.reason_phrase,
            response.content,
            response.headers.get("Retry-After"),
        )


def seconds(value: object) -> float | None:
    """A Retry-After in seconds; None for none, or for the HTTP-date form (not sent by
    the gateway)."""
    try:
        return None if value is None else max(0.0, float(str(value)))
    except ValueError:
        return None


class StreamBroken(ClientError):
    """The server ended the connection before the end of its answer: what came is partial.

    ``received``: audio bytes of an HTTP answer that had begun (None: no answer began);
    ``close_code``: the WebSocket close code (None: dropped without a close frame, or
    HTTP); ``detail``: the transport's own words.
    """

    def __init__(
        self,
        message: str,
        *,
        received: int | None = None,
        close_code: int | None = None,
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.received = received
        self.close_code = close_code
        self.detail = detail


def error_object(body: bytes) -> dict[str, Any] | None:
    """The ``error`` object of the gateway's (OpenAI-shaped) error body, if it is one."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error if isinstance(error, dict) else None


def error_message(body: bytes, fallback: str) -> str:
    """The message of the gateway's ``{"error": {"message": ...}}`` body, or the raw text."""
    error = error_object(body)
    if error is not None and "message" in error:
        return str(error["message"])
    return body.decode("utf-8", "replace").strip() or fallback
