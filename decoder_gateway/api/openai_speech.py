"""OpenAI's speech API: POST /v1/audio/speech, GET /v1/models, /v1/audio/models.

Drop-in for clients of OpenAI's ``client.audio.speech.create`` (and Open WebUI):

* ``model`` is accepted and not checked: one model is served, listed by
  ``GET /v1/models`` under its vLLM name and the aliases ``tts-1`` / ``tts-1-hd``;
* ``voice`` is one of our voice ids (or ``{"id": ...}``); OpenAI's built-in names
  (``alloy`` ...) speak with the default voice, unless a voice has that id; any
  other name is a 400 that lists the valid ones;
* ``input`` is 1 .. 4096 characters, as OpenAI's; ``instructions`` is ignored;
* every ``response_format`` streams while it is generated (see ``encoders``), at
  24 kHz unless ``sample_rate`` says otherwise; ``speed`` changes tempo, not pitch;
* ``stream_format: sse`` sends ``speech.audio.delta`` events (base64 of the file's
  next bytes) and a final ``speech.audio.done`` with usage; a failure after the
  first event sends an ``error`` event (OpenAI's error object) and no ``done``.

Errors before the first audio are HTTP errors in OpenAI's shape, with ``param``
naming the field at fault. A failure after the first byte of a plain audio
response aborts it (the chunked body ends without its terminator), as on
``/v1/audio/speech/stream``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from sse_starlette import EventSourceResponse

from decoder_gateway.api.errors import as_gateway_error, sse_error_event
from decoder_gateway.api.protocol import (
    AudioModelList,
    ErrorResponse,
    ModelCard,
    ModelList,
    OpenAISpeechRequest,
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechUsage,
)
from decoder_gateway.api.streaming import SpeechResponse, start_stream
from decoder_gateway.audio.encoders import DEFAULT_SAMPLE_RATE, FORMATS, AudioPipeline
from decoder_gateway.errors import InvalidRequest, StreamAborted, VoiceNotFound
from decoder_gateway.voices.catalog import Voice
from decoder_gateway.voices.service import VoiceService

router = APIRouter(tags=["OpenAI compatible"])
logger = logging.getLogger(__name__)

MODEL_ALIASES = ("tts-1", "tts-1-hd")
OPENAI_VOICES = frozenset(
    {
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "nova",
        "onyx",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    }
)
_STARTED = int(time.time())
_ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "Invalid request; `param` names the field"},
    413: {"model": ErrorResponse, "description": "Body over MAX_REQUEST_BODY_BYTES"},
    429: {"model": ErrorResponse, "description": "Too many concurrent streams"},
    500: {"model": ErrorResponse, "description": "The decoder failed (decoder_error)"},
    502: {"model": ErrorResponse, "description": "The LLM failed or wrote no speech"},
    503: {"model": ErrorResponse, "description": "The LLM is unreachable or not ready"},
}


async def resolve_voice(voices: VoiceService, name: str | None) -> Voice:
    """Our voice (packaged or cloned) by id; OpenAI's built-in names -> the default voice
    (unless a voice of ours has that name); else VoiceNotFound."""
    try:
        return await voices.resolve(name)
    except VoiceNotFound as err:
        if name and name.lower() in OPENAI_VOICES:
            return voices.catalog.resolve(None)
        raise VoiceNotFound(
            f"{err.message}; OpenAI's voice names ({', '.join(sorted(OPENAI_VOICES))}) "
            f"speak with the default voice, {voices.catalog.default_voice}",
            "voice",
        ) from None


def _models(request: Request) -> list[ModelCard]:
    name = request.app.state.gateway.llm.model
    ids = [name, *(alias for alias in MODEL_ALIASES if alias != name)]
    return [ModelCard(id=model_id, created=_STARTED) for model_id in ids]


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The one model served: its vLLM name, and the aliases ``tts-1`` and ``tts-1-hd``."""
    return ModelList(data=_models(request))


@router.get("/v1/audio/models")
async def list_audio_models(request: Request) -> AudioModelList:
    """The models of ``GET /v1/models`` as ``{"models": [...]}`` (what Open WebUI reads)."""
    return AudioModelList(models=_models(request))


@router.post(
    "/v1/audio/speech",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The audio file, streamed as it is generated; or server-sent "
            "events with stream_format=sse",
            "content": {
                **{fmt.content_type: {} for fmt in FORMATS.values()},
                "text/event-stream": {},
            },
        },
        **_ERROR_RESPONSES,
    },
)
async def create_speech(body: OpenAISpeechRequest, request: Request) -> Response:
    """OpenAI's speech endpoint. ``instructions`` is accepted and ignored; ``model`` is
    not checked (one model is served); ``sample_rate`` and ``temperature`` are extensions."""
    gateway = request.app.state.gateway
    service = gateway.speech
    fmt = FORMATS[body.response_format]
    rate = body.sample_rate or DEFAULT_SAMPLE_RATE
    if rate not in fmt.sample_rates:
        raise InvalidRequest(
            f"sample_rate {rate} is not available for {fmt.name}; use one of "
            f"{', '.join(map(str, fmt.sample_rates))}",
            "sample_rate",
        )
    job = await service.prepare(
        body.input,
        temperature=body.temperature,
        request_id=request.headers.get("x-request-id"),
        text_param="input",
        resolved_voice=await resolve_voice(gateway.voices, body.voice),
        ref_audio=body.ref_audio,
    )
    stream, first = await start_stream(service, job, "openai", request)
    try:
        pipeline = AudioPipeline(fmt.name, service.sample_rate, rate, body.speed)
    except BaseException as err:
        await stream.aclose(err)
        raise

    async def encoded() -> AsyncIterator[bytes]:
        """The file's bytes, chunk by chunk; encoding runs in a worker thread."""
        try:
            data = await asyncio.to_thread(pipeline.push, first.samples)
            if data:
                yield data
            async for audio in stream.audio():
                data = await asyncio.to_thread(pipeline.push, audio.samples)
                if data:
                    yield data
            data = await asyncio.to_thread(pipeline.finish)
            if data:
                yield data
        except Exception as err:
            stream.fail(err)
            raise
        finally:
            # Flushing and closing a container can take milliseconds: not on the loop.
            await asyncio.to_thread(pipeline.close)

    headers = {
        "X-Request-Id": job.request_id,
        "X-Sample-Rate": str(rate),
        "X-Channels": "1",
        "Cache-Control": "no-cache",
    }
    if fmt.name in ("pcm", "wav"):
        headers["X-Bit-Depth"] = "16"
    send_timeout = gateway.settings.slow_client_timeout_s
    if body.stream_format == "audio":

        async def audio_body() -> AsyncIterator[bytes]:
            try:
                async for data in encoded():
                    yield data
            except Exception as err:  # the stream has recorded it; cut the response
                raise StreamAborted(as_gateway_error(err).message) from err

        response = StreamingResponse(audio_body(), media_type=fmt.content_type, headers=headers)
        return SpeechResponse(response, stream, send_timeout)

    hop = gateway.decoder.hop_length

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for data in encoded():
                delta = SpeechAudioDelta(audio=base64.b64encode(data).decode("ascii"))
                yield {"data": delta.model_dump_json()}
        except Exception as err:  # after the first event: an error event, and no done
            yield sse_error_event(err)
            return
        tokens = pipeline.samples_in // hop
        usage = SpeechUsage(
            input_tokens=len(body.input),
            output_tokens=tokens,
            total_tokens=len(body.input) + tokens,
        )
        yield {"data": SpeechAudioDone(usage=usage).model_dump_json()}

    # sse-starlette frames the events, sets X-Accel-Buffering: no (proxies pass events
    # on at once) and ends the stream when the client goes away.
    response = EventSourceResponse(events(), headers=headers, sep="\n")
    return SpeechResponse(response, stream, send_timeout)
