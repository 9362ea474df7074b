"""WS /v1/audio/speech/stream: text streamed in as an LLM writes it, speech streamed out.

vLLM-Omni's streaming-text WebSocket, so clients written for it work unchanged:
``session.config``, ``input.text``, ``input.done`` and ``session.close`` in;
``audio.start``, audio, ``audio.done`` per sentence and ``session.done`` per
utterance out. The session itself (:mod:`decoder_gateway.serving.text_in`) knows no
WebSocket: this module turns frames into its calls and its events into frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

from decoder_gateway.api.errors import ws_error_frame
from decoder_gateway.api.protocol import ErrorMessage
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.stream_protocol import (
    AudioDone,
    AudioStart,
    InputText,
    SessionConfig,
    SessionDone,
)
from decoder_gateway.api.ws_session import (
    Connection,
    auth_reply,
    decode_message,
    open_session,
    validation_frame,
)
from decoder_gateway.errors import GatewayError, SlowClient
from decoder_gateway.serving.text_in import (
    SentenceBytes,
    SentenceEnded,
    SentenceStarted,
    TextInConfig,
    TextInEvent,
    TextInSession,
    UtteranceEnded,
    UtteranceFailed,
)
from decoder_gateway.settings import Settings

router = APIRouter()
logger = logging.getLogger(__name__)

_FRAMES: dict[type, type[BaseModel]] = {
    SentenceStarted: AudioStart,
    SentenceEnded: AudioDone,
    UtteranceEnded: SessionDone,
}


@router.websocket("/v1/audio/speech/stream")
async def text_stream_websocket(ws: WebSocket) -> None:
    gateway = get_gateway(ws)
    settings = gateway.settings
    conn = await open_session(ws, settings)
    if conn is None:
        return
    session = TextInSession(gateway.speech, SessionFrames(conn))
    try:
        await _receive(conn, session, settings)
    except (WebSocketDisconnect, SlowClient) as err:
        logger.info("text stream closed: %s", err)
    finally:
        await session.close()


class SessionFrames:
    """The session's transport: its events as this connection's frames."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @property
    def stalled(self) -> SlowClient | None:
        return self.conn.stalled

    async def send(self, event: TextInEvent) -> None:
        if isinstance(event, SentenceBytes):
            await self.conn.send_audio(event.data)
        elif isinstance(event, UtteranceFailed):
            await self.conn.send(ws_error_frame(event.error))
        else:
            await self.conn.send(_FRAMES[type(event)].model_validate(event, from_attributes=True))


async def _receive(conn: Connection, session: TextInSession, settings: Settings) -> None:
    """Client frames until the client closes, leaves, stalls or idles."""
    idle = settings.ws_idle_timeout_s
    while conn.stalled is None:
        try:
            raw = await asyncio.wait_for(conn.ws.receive(), idle)
        except TimeoutError:
            if session.busy:
                continue
            await conn.ws.close(code=1000, reason=f"idle for {idle:.0f} s")
            return
        if raw["type"] == "websocket.disconnect":
            return
        data = decode_message(raw, settings.ws_max_message_bytes)
        if isinstance(data, ErrorMessage):
            await conn.send(data)
            continue
        try:
            if await _handle(data, conn, session, settings) is False:
                return
        except ValidationError as err:
            await conn.send(validation_frame(err))
        except GatewayError as err:
            await conn.send(ws_error_frame(err))


async def _handle(
    data: dict[str, Any], conn: Connection, session: TextInSession, settings: Settings
) -> bool:
    """One client message; False ends the session."""
    kind = data.get("type")
    if kind == "input.text":
        await session.text(InputText.model_validate(data).text)
    elif kind == "input.done":
        await session.done()
    elif kind == "session.config":
        config = SessionConfig.model_validate(data)
        await session.configure(
            TextInConfig(
                temperature=config.temperature,
                max_tokens=config.max_tokens or config.max_new_tokens,
                response_format=config.response_format,
                stream_audio=config.stream_audio,
                speed=config.speed,
            ),
            config.voice,
            config.speaker_id,
            config.ref_audio,
        )
    elif kind == "session.close":
        await session.finish()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await conn.ws.close(code=1000)
        return False
    elif kind == "auth":
        await conn.send(auth_reply(data, settings.gateway_api_key))
    else:
        await conn.send(
            ErrorMessage(
                message=f"unknown message type {kind!r}: send session.config, input.text, "
                "input.done or session.close",
                code="invalid_message",
            )
        )
    return True
