"""What the WebSocket routes share: sends with deadlines, authentication, and
decoding a client frame into a JSON object (or the error frame that answers it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

from decoder_gateway.api.auth import authorized, key_matches
from decoder_gateway.api.protocol import AuthReply, ErrorMessage
from decoder_gateway.errors import SlowClient
from decoder_gateway.settings import Settings

POLICY_VIOLATION = 1008


class Connection:
    """A WebSocket whose sends never interleave (reader and speaker both send) and
    each have a deadline; a send past it raises SlowClient and marks the connection
    stalled (nothing more is sent on it)."""

    def __init__(self, ws: WebSocket, send_timeout_s: float) -> None:
        self.ws = ws
        self.send_timeout_s = send_timeout_s
        self.stalled: SlowClient | None = None
        self._lock = asyncio.Lock()

    async def send(self, message: BaseModel | dict[str, Any]) -> None:
        data = message.model_dump() if isinstance(message, BaseModel) else message
        await self._send({"type": "websocket.send", "text": json.dumps(data)})

    async def send_audio(self, pcm: bytes) -> None:
        await self._send({"type": "websocket.send", "bytes": pcm})

    async def _send(self, message: dict[str, Any]) -> None:
        if self.stalled is not None:
            raise self.stalled
        async with self._lock:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a
                # cancellation that comes as the send completes, and a cancel (a
                # barge-in) must stop its sender.
                async with asyncio.timeout(self.send_timeout_s):
                    await self.ws.send(message)
            except TimeoutError:
                self.stalled = SlowClient(
                    f"the client took nothing for {self.send_timeout_s:g} s; connection cut off"
                )
                raise self.stalled from None


def decode_message(raw: dict, max_bytes: int) -> dict[str, Any] | ErrorMessage:
    """A client frame -> its JSON object, or the error frame that answers it at once."""
    if raw.get("bytes") is not None:
        return ErrorMessage(
            message="binary frames are not accepted; send JSON text messages",
            code="invalid_message",
        )
    text = raw.get("text") or ""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return ErrorMessage(
            message=f"message of {size} bytes is over the limit of {max_bytes}",
            code="message_too_large",
        )
    try:
        data = json.loads(text)
    except ValueError as err:
        return ErrorMessage(message=f"message is not valid JSON: {err}", code="invalid_json")
    except RecursionError:
        return ErrorMessage(message="message is nested too deeply", code="invalid_json")
    if not isinstance(data, dict):
        return ErrorMessage(message="message must be a JSON object", code="invalid_message")
    return data


def auth_reply(data: dict[str, Any], api_key: str | None) -> AuthReply | ErrorMessage:
    """The answer to ``{"type": "auth", "api_key": ...}``, also from a client already let
    in by its headers: ok, or ``invalid_api_key`` (the connection stays open)."""
    presented = data.get("api_key")
    if api_key and not (isinstance(presented, str) and key_matches(api_key, presented)):
        return ErrorMessage(message="wrong API key", code="invalid_api_key")
    return AuthReply()


def validation_frame(err: ValidationError, segment_id: object = None) -> ErrorMessage:
    """An ``invalid_request`` frame naming each field at fault; ``segment_id`` echoed
    when it is a plain string or integer (never a boolean)."""
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    if isinstance(segment_id, bool) or not isinstance(segment_id, (str, int)):
        segment_id = None
    return ErrorMessage(message=detail, code="invalid_request", segment_id=segment_id)


async def open_session(ws: WebSocket, settings: Settings) -> Connection | None:
    """Accept ``ws`` and authenticate it: its connection, or None when it was refused
    (and closed) for a missing or wrong API key."""
    await ws.accept()
    conn = Connection(ws, settings.slow_client_timeout_s)
    if settings.gateway_api_key and not await authenticate(conn, settings):
        return None
    return conn


async def authenticate(conn: Connection, settings: Settings) -> bool:
    """Headers first; else a first message {"type": "auth", "api_key": ...}."""
    expected = settings.gateway_api_key
    if authorized(expected, conn.ws.scope["headers"]):
        return True
    try:
        raw = await asyncio.wait_for(conn.ws.receive(), timeout=settings.ws_auth_timeout_s)
        data = json.loads(raw.get("text") or "")
        presented = data.get("api_key") if data.get("type") == "auth" else None
    except (TimeoutError, ValueError, RecursionError, AttributeError):
        presented = None
    if isinstance(presented, str) and key_matches(expected, presented):
        await conn.send(AuthReply())
        return True
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, SlowClient):
        await conn.send(
            ErrorMessage(
                message="missing or wrong API key: send an 'Authorization: Bearer <key>' header "
                'or a first message {"type": "auth", "api_key": "<key>"}',
                code="invalid_api_key",
            )
        )
        await conn.ws.close(code=POLICY_VIOLATION)
    return False
