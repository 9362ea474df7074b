"""WS /v1/audio/speech/stream/ws: one synthesis per JSON message, in order.

For each message: ``start``, binary PCM16 frames, then ``end`` (or ``error``).
Bad messages get an error frame at once and the connection stays usable; an
empty ``input`` with ``continue: false`` closes it. A reader task keeps listening
during synthesis, so a client that leaves cancels its synthesis at once (and with
it the upstream request), and messages sent meanwhile wait in a bounded queue.

Every send has a deadline (SLOW_CLIENT_TIMEOUT_S): a client that stops reading
while its connection stays open is cut off, its synthesis stopped and its slot
freed.

With GATEWAY_API_KEY set, the key comes in the handshake headers or, from
browsers, as a first message ``{"type": "auth", "api_key": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

from ..audio import to_pcm16
from ..auth import authorized, key_matches
from ..errors import GatewayError, SlowClient
from ..protocol import (
    AuthReply,
    EndMessage,
    ErrorMessage,
    StartMessage,
    WebSocketSpeechMessage,
)
from .errors import ws_error_frame

router = APIRouter()
logger = logging.getLogger(__name__)

_CLOSED = object()
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
                await asyncio.wait_for(self.ws.send(message), self.send_timeout_s)
            except TimeoutError:
                self.stalled = SlowClient(
                    f"the client took nothing for {self.send_timeout_s:g} s; connection cut off"
                )
                raise self.stalled from None


def _invalid_request(err: ValidationError, data: dict[str, Any]) -> ErrorMessage:
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    segment_id = data.get("segment_id")
    if isinstance(segment_id, bool) or not isinstance(segment_id, (str, int)):
        segment_id = None
    return ErrorMessage(message=detail, code="invalid_request", segment_id=segment_id)


def parse_message(
    raw: dict, max_bytes: int, api_key: str | None = None
) -> WebSocketSpeechMessage | ErrorMessage | AuthReply:
    """A client frame -> a speech message, or the frame that answers it at once."""
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
    if data.get("type") == "auth":  # also from clients already let in by their headers
        presented = data.get("api_key")
        if api_key and not (isinstance(presented, str) and key_matches(api_key, presented)):
            return ErrorMessage(message="wrong API key", code="invalid_api_key")
        return AuthReply()
    try:
        return WebSocketSpeechMessage.model_validate(data)
    except ValidationError as err:
        return _invalid_request(err, data)


async def _read(
    conn: Connection, inbox: asyncio.Queue[object], max_bytes: int, api_key: str | None
) -> None:
    """Parse client frames into the inbox; answer bad or surplus ones at once.

    Ends only when the client goes away or stops reading; a message that cannot be
    parsed, whatever it holds, gets an error frame and reading goes on.
    """
    try:
        while True:
            raw = await conn.ws.receive()
            if raw["type"] == "websocket.disconnect":
                break
            try:
                message = parse_message(raw, max_bytes, api_key)
            except Exception as err:
                message = ws_error_frame(err)
            if isinstance(message, (ErrorMessage, AuthReply)):
                await conn.send(message)
                continue
            try:
                inbox.put_nowait(message)
            except asyncio.QueueFull:
                await conn.send(
                    ErrorMessage(
                        message=f"{inbox.maxsize} messages are already waiting; "
                        "wait for an end frame before sending more",
                        code="too_many_messages",
                        segment_id=message.segment_id,
                    )
                )
    except (WebSocketDisconnect, SlowClient):
        pass
    finally:
        with contextlib.suppress(asyncio.QueueFull):
            inbox.put_nowait(_CLOSED)


async def _speak(conn: Connection, gateway: Any, message: WebSocketSpeechMessage) -> None:
    """One message's synthesis; every failure ends in an error frame (SlowClient: none,
    the client is not reading)."""
    segment_id = message.segment_id
    service = gateway.speech
    try:
        job = await service.prepare(
            message.input,
            message.voice,
            message.speaker_id,
            message.temperature,
            message.max_tokens,
            ref_audio=message.ref_audio,
        )
        stream = await service.open(job, "websocket")
    except Exception as err:
        await conn.send(ws_error_frame(err, segment_id))
        return
    try:
        audio = stream.audio()
        first = await anext(audio)  # before `start`: a failure before audio gets only an error
        await conn.send(
            StartMessage(
                segment_id=segment_id,
                speaker_id=job.voice.speaker_id,
                voice=job.voice.id,
                request_id=job.request_id,
            )
        )
        await conn.send_audio(to_pcm16(first.samples))
        async for chunk in audio:
            await conn.send_audio(to_pcm16(chunk.samples))
        samples = stream.samples
        duration = samples / service.sample_rate
        await conn.send(EndMessage(segment_id=segment_id, samples=samples, duration_s=duration))
    except SlowClient:
        pass  # the client stopped reading: no frame would reach it
    except Exception as err:
        stream.fail(err)
        with contextlib.suppress(SlowClient):
            await conn.send(ws_error_frame(err, segment_id))
    finally:
        # Upstream aborted, then the slot freed; a stalled connection is the cause.
        await stream.aclose(conn.stalled)


async def _authenticate(conn: Connection, gateway: Any) -> bool:
    """Headers first; else a first message {"type": "auth", "api_key": ...}."""
    settings = gateway.settings
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


@router.websocket("/v1/audio/speech/stream/ws")
async def speech_websocket(ws: WebSocket) -> None:
    await ws.accept()
    gateway = ws.app.state.gateway
    settings = gateway.settings
    conn = Connection(ws, settings.slow_client_timeout_s)
    if settings.gateway_api_key and not await _authenticate(conn, gateway):
        return
    inbox: asyncio.Queue[object] = asyncio.Queue(settings.ws_max_queued_messages)
    reader = asyncio.create_task(
        _read(conn, inbox, settings.ws_max_message_bytes, settings.gateway_api_key)
    )
    try:
        while conn.stalled is None:
            try:
                message = await asyncio.wait_for(inbox.get(), settings.ws_idle_timeout_s)
            except TimeoutError:
                await ws.close(code=1000, reason=f"idle for {settings.ws_idle_timeout_s:.0f} s")
                break
            if message is _CLOSED:
                break
            assert isinstance(message, WebSocketSpeechMessage)
            if not message.input.strip():
                if not message.continue_:
                    await ws.close(code=1000)
                    break
                await conn.send(
                    ErrorMessage(
                        message="input is empty",
                        code="invalid_request",
                        segment_id=message.segment_id,
                    )
                )
                continue
            # Synthesize, but stop at once if the client goes away meanwhile.
            speaking = asyncio.create_task(_speak(conn, gateway, message))
            await asyncio.wait({speaking, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not speaking.done():
                speaking.cancel()
                await asyncio.gather(speaking, return_exceptions=True)
                break
            speaking.result()
    except (WebSocketDisconnect, SlowClient, GatewayError) as err:
        logger.info("websocket closed: %s", err)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    # A stalled client is not sent a close frame (it would wait on the same full
    # buffer): returning lets the server drop the connection.
