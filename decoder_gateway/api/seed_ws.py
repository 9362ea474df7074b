"""WS /v1/audio/speech/stream/ws: one synthesis per JSON message, in order.

Per message: ``start``, binary PCM16 frames, ``end`` (or ``error``). A reader task
keeps listening during synthesis, so a client that leaves stops its synthesis (and
the upstream request) at once, and messages sent meanwhile wait in a bounded queue.
Bad messages get an error frame and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from decoder_gateway.api.errors import ws_error_frame
from decoder_gateway.api.protocol import AuthReply, ErrorMessage
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.stream_protocol import (
    EndMessage,
    SegmentMessage,
    StartMessage,
    WebSocketSpeechMessage,
)
from decoder_gateway.api.ws_session import (
    Connection,
    auth_reply,
    decode_message,
    open_session,
    validation_frame,
)
from decoder_gateway.audio.pcm import to_pcm16
from decoder_gateway.errors import GatewayError, SlowClient
from decoder_gateway.serving import Audio, SegmentEnd, SegmentStart, SpeechService

router = APIRouter()
logger = logging.getLogger(__name__)

_CLOSED = object()


def parse_message(
    raw: dict, max_bytes: int, api_key: str | None = None
) -> WebSocketSpeechMessage | ErrorMessage | AuthReply:
    """A client frame -> a speech message, or the frame that answers it at once."""
    data = decode_message(raw, max_bytes)
    if isinstance(data, ErrorMessage):
        return data
    if data.get("type") == "auth":
        return auth_reply(data, api_key)
    try:
        return WebSocketSpeechMessage.model_validate(data)
    except ValidationError as err:
        return validation_frame(err, data.get("segment_id"))


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


async def _speak(conn: Connection, service: SpeechService, message: WebSocketSpeechMessage) -> None:
    """One message's synthesis; every failure ends in an error frame (SlowClient: none,
    the client is not reading)."""
    segment_id = message.segment_id
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
    rate = service.sample_rate
    started = False
    segment_starts: dict[int, tuple[str, int]] = {}  # index -> (text, first sample)
    try:
        async for event in stream:
            if isinstance(event, SegmentStart):
                segment_starts[event.index] = (event.text, stream.samples)
            elif isinstance(event, Audio):
                if not started:  # `start` waits for audio: an early failure gets only an error
                    started = True
                    await conn.send(
                        StartMessage(
                            segment_id=segment_id,
                            speaker_id=job.voice.speaker_id,
                            voice=job.voice.id,
                            request_id=job.request_id,
                        )
                    )
                await conn.send_audio(to_pcm16(event.samples))
            elif isinstance(event, SegmentEnd) and message.timestamps:
                text, first_sample = segment_starts.pop(event.index)
                await conn.send(
                    SegmentMessage(
                        segment_id=segment_id,
                        index=event.index,
                        text=text,
                        start_s=first_sample / rate,
                        end_s=stream.samples / rate,
                    )
                )
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


@router.websocket("/v1/audio/speech/stream/ws")
async def speech_websocket(ws: WebSocket) -> None:
    gateway = get_gateway(ws)
    settings = gateway.settings
    conn = await open_session(ws, settings)
    if conn is None:
        return
    inbox: asyncio.Queue[object] = asyncio.Queue(settings.ws_max_queued_messages)
    reader = asyncio.create_task(
        _read(conn, inbox, settings.ws_max_message_bytes, settings.gateway_api_key)
    )
    try:
        await _serve(conn, gateway.speech, inbox, reader, settings.ws_idle_timeout_s)
    except (WebSocketDisconnect, SlowClient, GatewayError) as err:
        logger.info("websocket closed: %s", err)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    # A stalled client is not sent a close frame (it would wait on the same full
    # buffer): returning lets the server drop the connection.


async def _serve(
    conn: Connection,
    service: SpeechService,
    inbox: asyncio.Queue[object],
    reader: asyncio.Task[None],
    idle_timeout_s: float,
) -> None:
    """The inbox's messages, one synthesis at a time, until the client closes, leaves,
    stalls or idles."""
    while conn.stalled is None:
        try:
            message = await asyncio.wait_for(inbox.get(), idle_timeout_s)
        except TimeoutError:
            await conn.ws.close(code=1000, reason=f"idle for {idle_timeout_s:.0f} s")
            return
        if message is _CLOSED:
            return
        assert isinstance(message, WebSocketSpeechMessage)
        if not message.input.strip():
            if not message.continue_:
                await conn.ws.close(code=1000)
                return
            await conn.send(
                ErrorMessage(
                    message="input is empty",
                    code="invalid_request",
                    segment_id=message.segment_id,
                )
            )
            continue
        # Synthesize, but stop at once if the client goes away meanwhile.
        speaking = asyncio.create_task(_speak(conn, service, message))
        await asyncio.wait({speaking, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not speaking.done():
            speaking.cancel()
            await asyncio.gather(speaking, return_exceptions=True)
            return
        speaking.result()
