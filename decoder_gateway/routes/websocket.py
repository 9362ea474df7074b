"""WS /v1/audio/speech/stream/ws: one synthesis per JSON message, in order.

For each message: ``start``, binary PCM16 frames, then ``end`` (or ``error``).
Bad messages get an error frame and the connection stays usable; an empty
``input`` with ``continue: false`` closes it. A reader task keeps listening
during synthesis, so a client that leaves cancels its synthesis at once (and
with it the upstream request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from ..audio import PCM_SAMPLE_WIDTH, to_pcm16
from ..errors import GatewayError
from ..protocol import EndMessage, ErrorMessage, StartMessage, WebSocketSpeechMessage

router = APIRouter()
logger = logging.getLogger(__name__)

_CLOSED = object()


def parse_message(raw: dict) -> WebSocketSpeechMessage | ErrorMessage:
    """A client frame -> a speech message, or the error frame that answers it."""
    if raw.get("bytes") is not None:
        return ErrorMessage(
            message="binary frames are not accepted; send JSON text messages",
            code="invalid_message",
        )
    try:
        data = json.loads(raw.get("text") or "")
    except ValueError as err:
        return ErrorMessage(message=f"message is not valid JSON: {err}", code="invalid_json")
    if not isinstance(data, dict):
        return ErrorMessage(message="message must be a JSON object", code="invalid_message")
    try:
        return WebSocketSpeechMessage.model_validate(data)
    except ValidationError as err:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        segment_id = data.get("segment_id")
        if not isinstance(segment_id, (str, int)):
            segment_id = None
        return ErrorMessage(message=detail, code="invalid_request", segment_id=segment_id)


async def _read(ws: WebSocket, inbox: asyncio.Queue[object]) -> None:
    try:
        while True:
            raw = await ws.receive()
            if raw["type"] == "websocket.disconnect":
                break
            await inbox.put(parse_message(raw))
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        inbox.put_nowait(_CLOSED)


async def _speak(ws: WebSocket, gateway, message: WebSocketSpeechMessage) -> None:
    segment_id = message.segment_id
    try:
        job = gateway.synthesizer.prepare(
            message.input,
            message.voice,
            message.speaker_id,
            message.temperature,
            message.max_tokens,
        )
        gateway.slots.acquire()
    except GatewayError as err:
        await ws.send_json(
            ErrorMessage(message=err.message, code=err.code, segment_id=segment_id).model_dump()
        )
        return
    samples = 0
    audio = gateway.synthesizer.stream(job)
    try:
        await ws.send_json(
            StartMessage(
                segment_id=segment_id,
                speaker_id=job.voice.speaker_id,
                voice=job.voice.id,
                request_id=job.request_id,
            ).model_dump()
        )
        async for chunk in audio:
            pcm = to_pcm16(chunk)
            samples += len(pcm) // PCM_SAMPLE_WIDTH
            await ws.send_bytes(pcm)
        rate = gateway.synthesizer.sample_rate
        await ws.send_json(
            EndMessage(
                segment_id=segment_id, samples=samples, duration_s=samples / rate
            ).model_dump()
        )
    except GatewayError as err:
        logger.error("request %s failed: %s", job.request_id, err.message)
        await ws.send_json(
            ErrorMessage(message=err.message, code=err.code, segment_id=segment_id).model_dump()
        )
    finally:
        await audio.aclose()
        gateway.slots.release()


@router.websocket("/v1/audio/speech/stream/ws")
async def speech_websocket(ws: WebSocket) -> None:
    await ws.accept()
    gateway = ws.app.state.gateway
    inbox: asyncio.Queue[object] = asyncio.Queue()
    reader = asyncio.create_task(_read(ws, inbox))
    try:
        while (message := await inbox.get()) is not _CLOSED:
            if isinstance(message, ErrorMessage):
                await ws.send_json(message.model_dump())
                continue
            assert isinstance(message, WebSocketSpeechMessage)
            if not message.input.strip():
                if not message.continue_:
                    await ws.close(code=1000)
                    break
                await ws.send_json(
                    ErrorMessage(
                        message="input is empty",
                        code="invalid_request",
                        segment_id=message.segment_id,
                    ).model_dump()
                )
                continue
            # Synthesize, but stop at once if the client goes away meanwhile.
            speaking = asyncio.create_task(_speak(ws, gateway, message))
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
