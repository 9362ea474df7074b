"""WS /v1/audio/speech/stream/ws: one synthesis per JSON message, in order.

Per message: ``start``, binary audio frames, ``end`` (or ``error``). A reader task
keeps listening during synthesis, so a client that leaves stops its synthesis (and
the upstream request) at once, messages sent meanwhile wait in a bounded queue, and
``{"type": "cancel", "segment_id": X}`` stops message X at once, whether it is being
spoken or waiting (a barge-in): answered by ``cancelled``, after which nothing of X
is sent. Bad messages get an error frame and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from decoder_gateway.api.errors import ws_error_frame
from decoder_gateway.api.protocol import AuthReply, ErrorMessage
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.stream_protocol import (
    CancelledMessage,
    CancelMessage,
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
from decoder_gateway.audio.encoders import FORMATS
from decoder_gateway.errors import CancelledByClient, GatewayError, SlowClient
from decoder_gateway.serving import Audio, SegmentEnd, SegmentStart, SpeechService, SpeechStream
from decoder_gateway.serving.output import OutputAudio
from decoder_gateway.serving.spoken import SentSentences, send_whole

router = APIRouter()
logger = logging.getLogger(__name__)

_CLOSED = object()
Inbox = asyncio.Queue[object]  # messages waiting, then _CLOSED


@dataclass
class _Speaking:
    """The message being spoken, and what its client was sent of it."""

    message: WebSocketSpeechMessage
    sample_rate: int  # of the audio sent
    task: asyncio.Task[None] | None = None
    stream: SpeechStream | None = None
    samples_sent: int = 0
    sentences: SentSentences = field(default_factory=SentSentences)
    # Set by a cancel before it cancels the task: the request's outcome.
    cancelled: CancelledByClient | None = None
    # Its end (or error) frame is going out: too late for a cancel to stop it.
    answered: bool = False

    def cancellable(self, segment_id: object) -> bool:
        return (
            not self.answered and self.cancelled is None and self.message.segment_id == segment_id
        )

    def cancelled_frame(self) -> CancelledMessage:
        """The answer to the cancel that stopped it (its task has ended)."""
        stream = self.stream
        spoken = self.sentences.spoken(stream.segment_samples if stream else lambda _: None)
        assert self.message.segment_id is not None
        return CancelledMessage(
            segment_id=self.message.segment_id,
            status="cancelled",
            audio_seconds=self.samples_sent / self.sample_rate,
            spoken_text=spoken.text,
            spoken_until=spoken.until,
        )


@dataclass
class _Session:
    """One connection's messages: those waiting, and the one being spoken."""

    conn: Connection
    inbox: Inbox
    speaking: _Speaking | None = None

    def drop_waiting(self, segment_id: object) -> int:
        """Take the waiting messages of ``segment_id`` out of the inbox; how many."""
        kept, dropped = [], 0
        while not self.inbox.empty():
            item = self.inbox.get_nowait()
            if isinstance(item, WebSocketSpeechMessage) and item.segment_id == segment_id:
                dropped += 1
            else:
                kept.append(item)
        for item in kept:
            self.inbox.put_nowait(item)
        return dropped


def parse_message(
    raw: dict, max_bytes: int, api_key: str | None = None
) -> WebSocketSpeechMessage | CancelMessage | ErrorMessage | AuthReply:
    """A client frame -> a speech message or a cancel, or the frame that answers it at once."""
    data = decode_message(raw, max_bytes)
    if isinstance(data, ErrorMessage):
        return data
    if data.get("type") == "auth":
        return auth_reply(data, api_key)
    try:
        if data.get("type") == "cancel":
            return CancelMessage.model_validate(data)
        return WebSocketSpeechMessage.model_validate(data)
    except ValidationError as err:
        return validation_frame(err, data.get("segment_id"))


async def _read(session: _Session, max_bytes: int, api_key: str | None) -> None:
    """Parse client frames into the inbox; answer bad or surplus ones, and cancels, at
    once.

    Ends only when the client goes away or stops reading; a message that cannot be
    parsed, whatever it holds, gets an error frame and reading goes on.
    """
    conn, inbox = session.conn, session.inbox
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
            if isinstance(message, CancelMessage):
                await _cancel(session, message.segment_id)
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


async def _cancel(session: _Session, segment_id: str | int) -> None:
    """Stop message ``segment_id``: the one being spoken (the serve loop answers once
    it has stopped, upstream aborted) and any waiting; one answer per cancel."""
    dropped = session.drop_waiting(segment_id)
    speaking = session.speaking
    if speaking is not None and speaking.cancellable(segment_id):
        assert speaking.task is not None
        speaking.cancelled = CancelledByClient(f"segment {segment_id!r} cancelled by the client")
        speaking.task.cancel()
        return
    await session.conn.send(
        CancelledMessage(
            segment_id=segment_id,
            status="dropped" if dropped else "not_found",
            audio_seconds=0.0,
            spoken_text="",
            spoken_until="sentence",
        )
    )


async def _speak(conn: Connection, service: SpeechService, speaking: _Speaking) -> None:
    """One message's synthesis; every failure ends in an error frame (SlowClient: none,
    the client is not reading). A cancel stops it where it is (CancelledError)."""
    message = speaking.message
    segment_id = message.segment_id
    try:
        job = await service.prepare(
            message.input,
            message.voice,
            message.speaker_id,
            message.temperature,
            message.max_tokens,
            ref_audio=message.ref_audio,
            style=message.style.to_style() if message.style else None,
        )
        stream = speaking.stream = await service.open(job, "websocket")
    except Exception as err:
        speaking.answered = True
        await conn.send(ws_error_frame(err, segment_id))
        return
    rate = service.sample_rate
    audio = OutputAudio(message.response_format, rate, speaking.sample_rate)
    started = False
    segment_starts: dict[int, tuple[str, int]] = {}  # index -> (text, first sample)

    async def send_counted(data: bytes, samples: int) -> None:
        await conn.send_audio(data)
        speaking.samples_sent += samples
        speaking.sentences.sent(audio.model_samples(samples))

    try:
        async for event in stream:
            if speaking.cancelled is not None:  # its cancellation was lost on the way
                raise asyncio.CancelledError
            if isinstance(event, SegmentStart):
                segment_starts[event.index] = (event.text, stream.samples)
                speaking.sentences.start(event.index, event.text)
            elif isinstance(event, Audio):
                if not started:  # `start` waits for audio: an early failure gets only an error
                    started = True
                    await conn.send(
                        StartMessage(
                            segment_id=segment_id,
                            speaker_id=job.voice.speaker_id,
                            voice=job.voice.id,
                            request_id=job.request_id,
                            sample_rate=speaking.sample_rate,
                            # A style request's voice, known before its first audio.
                            global_tokens=stream.designed_tokens,
                        )
                    )
                data, samples = await audio.push(event.samples)
                if data:
                    await send_whole(send_counted(data, samples))
            elif isinstance(event, SegmentEnd):
                speaking.sentences.end()
                if message.timestamps:
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
        data, samples = await audio.finish()
        if data:
            await send_whole(send_counted(data, samples))
        speaking.answered = True
        samples = speaking.samples_sent
        duration = samples / speaking.sample_rate
        await conn.send(EndMessage(segment_id=segment_id, samples=samples, duration_s=duration))
    except SlowClient:
        pass  # the client stopped reading: no frame would reach it
    except Exception as err:
        stream.fail(err)
        speaking.answered = True
        with contextlib.suppress(SlowClient):
            await conn.send(ws_error_frame(err, segment_id))
    finally:
        # Upstream aborted, then the slot freed; a stalled connection or a cancel is
        # the cause.
        await stream.aclose(conn.stalled or speaking.cancelled)
        await audio.close()


@router.websocket("/v1/audio/speech/stream/ws")
async def speech_websocket(ws: WebSocket) -> None:
    gateway = get_gateway(ws)
    settings = gateway.settings
    conn = await open_session(ws, settings)
    if conn is None:
        return
    session = _Session(conn, asyncio.Queue(settings.ws_max_queued_messages))
    reader = asyncio.create_task(
        _read(session, settings.ws_max_message_bytes, settings.gateway_api_key)
    )
    try:
        await _serve(session, gateway.speech, reader, settings.ws_idle_timeout_s)
    except (WebSocketDisconnect, SlowClient, GatewayError) as err:
        logger.info("websocket closed: %s", err)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    # A stalled client is not sent a close frame (it would wait on the same full
    # buffer): returning lets the server drop the connection.


async def _serve(
    session: _Session,
    service: SpeechService,
    reader: asyncio.Task[None],
    idle_timeout_s: float,
) -> None:
    """The inbox's messages, one synthesis at a time, until the client closes, leaves,
    stalls or idles."""
    conn = session.conn
    while conn.stalled is None:
        try:
            message = await asyncio.wait_for(session.inbox.get(), idle_timeout_s)
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
        # Synthesize, but stop at once if the client goes away meanwhile. Nothing may
        # be awaited between taking the message and making it `speaking`: a cancel
        # finds every message either waiting or there.
        rate = message.sample_rate or FORMATS[message.response_format].default_rate
        speaking = _Speaking(message, rate or service.sample_rate)
        speaking.task = asyncio.create_task(_speak(conn, service, speaking))
        session.speaking = speaking
        await asyncio.wait({speaking.task, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not speaking.task.done():
            speaking.task.cancel()
            await asyncio.gather(speaking.task, return_exceptions=True)
            return
        session.speaking = None
        if speaking.cancelled is not None and speaking.task.cancelled():
            # Stopped by a cancel, its upstream requests aborted: the answer comes after
            # everything it sent.
            await conn.send(speaking.cancelled_frame())
            continue
        speaking.task.result()
