"""WS /v1/audio/speech/stream: text streamed in as an LLM writes it, speech streamed out.

vLLM-Omni's streaming-text WebSocket, so clients written for it work unchanged:
``session.config``, ``input.text``, ``input.done`` and ``session.close`` in;
``audio.start``, audio, ``audio.done`` per sentence and ``session.done`` per
utterance out. Ours besides: ``input.cancel`` in (a barge-in), ``audio.cancelled``
out. The session itself (:mod:`decoder_gateway.serving.text_in`) knows no WebSocket:
this module turns frames into its calls and its events into frames.

Messages are handled one after another, in order, while a reader task goes on reading
frames (up to a bound, then the client waits), so that an ``input.cancel`` is seen at
once: it stops a fragment that waits for admission, and the text queued before it is
counted into the utterances it stops, not spoken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Coroutine
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

from decoder_gateway.api.errors import ws_error_frame
from decoder_gateway.api.protocol import ErrorMessage
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.stream_protocol import (
    AudioCancelled,
    AudioDone,
    AudioStart,
    InputCancel,
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
    UtteranceCancelled,
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
    UtteranceCancelled: AudioCancelled,
}


@router.websocket("/v1/audio/speech/stream")
async def text_stream_websocket(ws: WebSocket) -> None:
    gateway = get_gateway(ws)
    settings = gateway.settings
    conn = await open_session(ws, settings)
    if conn is None:
        return
    session = TextInSession(gateway.speech, SessionFrames(conn))
    inbox = _Inbox()
    reader = asyncio.create_task(_read(conn, inbox, settings.ws_max_message_bytes))
    try:
        await _serve(conn, session, inbox, settings)
    except (WebSocketDisconnect, SlowClient) as err:
        logger.info("text stream closed: %s", err)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
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


_CLOSED = object()  # the client has gone
_TEXT = ("input.text", "input.done")
# Frames read ahead of the one being handled; past this the reader waits (TCP holds
# the rest), as a client writing faster than admission lets it speak would otherwise
# fill memory. Generous: a voice agent sends a fragment per LLM token.
MAX_READ_AHEAD = 256


class _Inbox:
    """Frames read, in order, for the serve loop; and what a cancel must reach at once:
    the text being handled, and how many cancels are on their way (text before a
    cancel is not spoken)."""

    def __init__(self) -> None:
        self.frames: deque[object] = deque()
        self.cancels = 0  # input.cancel frames read and not yet handled
        self.handling_text: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def put(self, frame: object) -> None:
        self.frames.append(frame)
        if isinstance(frame, dict) and frame.get("type") == "input.cancel":
            self.cancels += 1
            if self.handling_text is not None:
                self.handling_text.cancel()
        self._wake()

    def take(self) -> object:
        frame = self.frames.popleft()
        self._wake()
        return frame

    def changed(self) -> Coroutine[Any, Any, bool]:
        """Wait for the next frame in or out; bound now, so that no change between this
        call and the wait is missed."""
        return self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


async def _read(conn: Connection, inbox: _Inbox, max_bytes: int) -> None:
    """Client frames into the inbox (decoded, or the error frame answering them)."""
    try:
        while True:
            while len(inbox.frames) >= MAX_READ_AHEAD:
                await inbox.changed()
            raw = await conn.ws.receive()
            if raw["type"] == "websocket.disconnect":
                break
            inbox.put(decode_message(raw, max_bytes))
    except (WebSocketDisconnect, RuntimeError):
        pass  # RuntimeError: receive after the server closed the connection
    finally:
        inbox.put(_CLOSED)


async def _serve(
    conn: Connection, session: TextInSession, inbox: _Inbox, settings: Settings
) -> None:
    """Client frames, in order, until the client closes, leaves, stalls or idles."""
    idle = settings.ws_idle_timeout_s
    while conn.stalled is None:
        if not inbox.frames:
            try:
                await asyncio.wait_for(inbox.changed(), idle)
            except TimeoutError:
                if not session.busy:
                    await conn.ws.close(code=1000, reason=f"idle for {idle:.0f} s")
                    return
            continue
        data = inbox.take()
        if data is _CLOSED:
            return
        if isinstance(data, ErrorMessage):
            await conn.send(data)
            continue
        assert isinstance(data, dict)
        kind = data.get("type")
        if kind == "input.cancel":
            inbox.cancels -= 1
            await _reply(conn, _cancel(data, session))
        elif kind == "session.close":
            await session.finish()
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await conn.ws.close(code=1000)
            return
        elif kind in _TEXT and inbox.cancels:
            session.skip(done=kind == "input.done")  # a cancel behind it stops it
        elif kind in _TEXT:
            # A task, so that a cancel read meanwhile stops it (a wait for admission).
            began = False

            async def handle_text(data: dict[str, Any] = data) -> None:
                nonlocal began
                began = True
                await _reply(conn, _handle(data, conn, session, settings))

            handling = inbox.handling_text = asyncio.create_task(handle_text())
            try:
                await asyncio.wait({handling})
            finally:
                inbox.handling_text = None
                handling.cancel()  # only when this loop itself is cancelled
            if not handling.cancelled():
                handling.result()
            elif not began:  # stopped before it started: still an utterance to stop
                session.skip(done=kind == "input.done")
        else:
            await _reply(conn, _handle(data, conn, session, settings))


async def _reply(conn: Connection, handled: Awaitable[None]) -> None:
    """Handle one message; a bad one is answered with an error frame."""
    try:
        await handled
    except ValidationError as err:
        await conn.send(validation_frame(err))
    except GatewayError as err:
        if isinstance(err, SlowClient):
            raise
        await conn.send(ws_error_frame(err))


async def _cancel(data: dict[str, Any], session: TextInSession) -> None:
    InputCancel.model_validate(data)
    await session.cancel()


async def _handle(
    data: dict[str, Any], conn: Connection, session: TextInSession, settings: Settings
) -> None:
    """One client message (not input.cancel, nor session.close: the loop's own)."""
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
                sample_rate=config.sample_rate,
            ),
            config.voice,
            config.speaker_id,
            config.ref_audio,
            config.style.to_style() if config.style else None,
        )
    elif kind == "auth":
        await conn.send(auth_reply(data, settings.gateway_api_key))
    else:
        await conn.send(
            ErrorMessage(
                message=f"unknown message type {kind!r}: send session.config, input.text, "
                "input.done, input.cancel or session.close",
                code="invalid_message",
            )
        )
