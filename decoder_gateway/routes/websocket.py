"""WS /v1/audio/speech/stream/ws: one synthesis per JSON message, in order.

For each message: ``start``, binary PCM16 frames, then ``end`` (or ``error``).
Bad messages get an error frame at once and the connection stays usable; an
empty ``input`` with ``continue: false`` closes it. A reader task keeps listening
during synthesis, so a client that leaves cancels its synthesis at once (and with
it the upstream request), and messages sent meanwhile wait in a bounded queue.

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

from ..audio import PCM_SAMPLE_WIDTH, to_pcm16
from ..auth import key_matches, presented_key
from ..errors import GatewayError
from ..protocol import (
    AuthReply,
    EndMessage,
    ErrorMessage,
    StartMessage,
    WebSocketSpeechMessage,
)

router = APIRouter()
logger = logging.getLogger(__name__)

_CLOSED = object()
POLICY_VIOLATION = 1008


class Connection:
    """A WebSocket whose sends never interleave (reader and speaker both send)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self._lock = asyncio.Lock()

    async def send(self, message: BaseModel | dict[str, Any]) -> None:
        data = message.model_dump() if isinstance(message, BaseModel) else message
        async with self._lock:
            await self.ws.send_json(data)

    async def send_audio(self, pcm: bytes) -> None:
        async with self._lock:
            await self.ws.send_bytes(pcm)


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
    if len(text.encode()) > max_bytes:
        return ErrorMessage(
            message=f"message of {len(text.encode())} bytes is over the limit of {max_bytes}",
            code="message_too_large",
        )
    try:
        data = json.loads(text)
    except ValueError as err:
        return ErrorMessage(message=f"message is not valid JSON: {err}", code="invalid_json")
    if not isinstance(data, dict):
        return ErrorMessage(message="message must be a JSON object", code="invalid_message")
    if data.get("type") == "auth":  # also from clients already let in by their headers
        if api_key and not key_matches(api_key, str(data.get("api_key", ""))):
            return ErrorMessage(message="wrong API key", code="invalid_api_key")
        return AuthReply()
    try:
        return WebSocketSpeechMessage.model_validate(data)
    except ValidationError as err:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        segment_id = data.get("segment_id")
        if not isinstance(segment_id, (str, int)):
            segment_id = None
        return ErrorMessage(message=detail, code="invalid_request", segment_id=segment_id)


async def _read(
    conn: Connection, inbox: asyncio.Queue[object], max_bytes: int, api_key: str | None
) -> None:
    """Parse client frames into the inbox; answer bad or surplus ones at once."""
    try:
        while True:
            raw = await conn.ws.receive()
            if raw["type"] == "websocket.disconnect":
                break
            message = parse_message(raw, max_bytes, api_key)
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
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        with contextlib.suppress(asyncio.QueueFull):
            inbox.put_nowait(_CLOSED)


async def _speak(conn: Connection, gateway: Any, message: WebSocketSpeechMessage) -> None:
    segment_id = message.segment_id
    synthesizer = gateway.synthesizer
    try:
        job = synthesizer.prepare(
            message.input,
            message.voice,
            message.speaker_id,
            message.temperature,
            message.max_tokens,
        )
    except GatewayError as err:
        await conn.send(ErrorMessage(message=err.message, code=err.code, segment_id=segment_id))
        return
    samples = 0
    audio = synthesizer.stream(job, endpoint="websocket")
    try:
        first = await anext(audio)  # before `start`: a refused request (429) gets only an error
        await conn.send(
            StartMessage(
                segment_id=segment_id,
                speaker_id=job.voice.speaker_id,
                voice=job.voice.id,
                request_id=job.request_id,
            )
        )
        pcm = to_pcm16(first)
        samples += len(pcm) // PCM_SAMPLE_WIDTH
        await conn.send_audio(pcm)
        async for chunk in audio:
            pcm = to_pcm16(chunk)
            samples += len(pcm) // PCM_SAMPLE_WIDTH
            await conn.send_audio(pcm)
        duration = samples / synthesizer.sample_rate
        await conn.send(EndMessage(segment_id=segment_id, samples=samples, duration_s=duration))
    except StopAsyncIteration:  # cannot happen: a stream without audio raises instead
        await conn.send(ErrorMessage(message="no audio", code="no_audio", segment_id=segment_id))
    except GatewayError as err:
        await conn.send(ErrorMessage(message=err.message, code=err.code, segment_id=segment_id))
    finally:
        await audio.aclose()


async def _authenticate(conn: Connection, gateway: Any) -> bool:
    """Headers first; else a first message {"type": "auth", "api_key": ...}."""
    settings = gateway.settings
    if key_matches(settings.gateway_api_key, presented_key(conn.ws.scope["headers"])):
        return True
    try:
        raw = await asyncio.wait_for(conn.ws.receive(), timeout=settings.ws_auth_timeout_s)
        data = json.loads(raw.get("text") or "")
        presented = data.get("api_key") if data.get("type") == "auth" else None
    except (TimeoutError, ValueError, AttributeError):
        presented = None
    if isinstance(presented, str) and key_matches(settings.gateway_api_key, presented):
        await conn.send(AuthReply())
        return True
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
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
    conn = Connection(ws)
    if settings.gateway_api_key and not await _authenticate(conn, gateway):
        return
    inbox: asyncio.Queue[object] = asyncio.Queue(settings.ws_max_queued_messages)
    reader = asyncio.create_task(
        _read(conn, inbox, settings.ws_max_message_bytes, settings.gateway_api_key)
    )
    try:
        while True:
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
    except (WebSocketDisconnect, RuntimeError) as err:
        logger.info("websocket closed: %s", err)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
