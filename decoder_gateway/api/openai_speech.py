"""OpenAI's speech API: POST /v1/audio/speech, GET /v1/models, /v1/audio/models.

A drop-in for clients of OpenAI's ``client.audio.speech.create`` (and Open WebUI):
``model`` is not checked (one model is served, also as ``tts-1`` / ``tts-1-hd``);
OpenAI's voice names speak with the default voice; every format streams while it is
generated. Errors before the first audio are HTTP errors in OpenAI's shape; after it,
a plain audio response is cut off and an SSE stream ends with an ``error`` event.
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
from decoder_gateway.api.openai_protocol import (
    AudioModelList,
    ModelCard,
    ModelList,
    OpenAISpeechRequest,
    SpeechAudioDelta,
    SpeechAudioDone,
    SpeechUsage,
)
from decoder_gateway.api.protocol import VOICE_GLOBAL_TOKENS_HEADER, ErrorResponse
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.streaming import SpeechResponse, start_stream
from decoder_gateway.audio.encoders import (
    DEFAULT_SAMPLE_RATE,
    FORMATS,
    AudioFormat,
    AudioPipeline,
)
from decoder_gateway.errors import InvalidRequest, StreamAborted, VoiceNotFound
from decoder_gateway.llm.prompt import VoiceStyle
from decoder_gateway.serving import Audio, SpeechService, SpeechStream
from decoder_gateway.serving.style import check_style_enabled, style_from_instructions
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
# The voice that a style request names here, where OpenAI's SDK always sends a voice:
# a voice designed for the request from `style` or, without one, from `instructions`.
DESIGN_VOICE = "design"
_STARTED = int(time.time())
_ERROR_RESPONSES = {
    400: {"model": ErrorResponse, "description": "Invalid request; `param` names the field"},
    413: {"model": ErrorResponse, "description": "Body over MAX_REQUEST_BODY_BYTES"},
    429: {"model": ErrorResponse, "description": "Too many concurrent streams"},
    500: {"model": ErrorResponse, "description": "The decoder failed (decoder_error)"},
    501: {"model": ErrorResponse, "description": "A style request with VOICE_DESIGN off"},
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
    name = get_gateway(request).llm.model
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
    """OpenAI's speech endpoint. ``model`` is not checked (one model is served);
    ``sample_rate``, ``temperature`` and ``style`` are extensions. ``instructions`` names
    the style labels with the voice ``design``; with any other voice it is ignored."""
    gateway = get_gateway(request)
    service = gateway.speech
    fmt, rate = _output(body)
    style = _style(body, service)
    job = await service.prepare(
        body.input,
        temperature=body.temperature,
        request_id=request.headers.get("x-request-id"),
        text_param="input",
        resolved_voice=None if style else await resolve_voice(gateway.voices, body.voice),
        ref_audio=body.ref_audio,
        style=style,
    )
    stream, first = await start_stream(service, job, "openai", request)
    try:
        pipeline = AudioPipeline(fmt.name, service.sample_rate, rate, body.speed)
    except BaseException as err:
        await stream.aclose(err)
        raise
    encoded = _encoded(stream, first, pipeline)
    headers = _headers(job.request_id, fmt, rate)
    if (tokens := stream.designed_tokens) is not None:  # a style request's voice
        headers[VOICE_GLOBAL_TOKENS_HEADER] = ",".join(map(str, tokens))
    if body.stream_format == "audio":
        response: Response = StreamingResponse(
            _audio_body(encoded), media_type=fmt.content_type, headers=headers
        )
    else:
        # sse-starlette frames the events, sets X-Accel-Buffering: no (proxies pass events
        # on at once) and ends the stream when the client goes away.
        events = _sse_events(encoded, pipeline, len(body.input), gateway.decoder.hop_length)
        response = EventSourceResponse(events, headers=headers, sep="\n")
    return SpeechResponse(response, stream, gateway.settings.slow_client_timeout_s)


def _style(body: OpenAISpeechRequest, service: SpeechService) -> VoiceStyle | None:
    """A style request's labels: ``style`` (with no voice, or ``design``), or the
    ``instructions`` of the voice ``design``; None for a request with a voice."""
    if body.style is not None:
        if body.voice not in (None, DESIGN_VOICE):
            raise InvalidRequest(
                f"voice {body.voice!r} and style were both given: style makes the request's "
                f"voice, so send voice {DESIGN_VOICE!r} (or none) with it",
                "voice",
            )
        return body.style.to_style()
    if body.voice == DESIGN_VOICE:
        check_style_enabled(service.settings.voice_design)
        return style_from_instructions(body.instructions)
    return None


def _output(body: OpenAISpeechRequest) -> tuple[AudioFormat, int]:
    """The response's format and sample rate; InvalidRequest for a rate it lacks."""
    fmt = FORMATS[body.response_format]
    rate = body.sample_rate or fmt.default_rate or DEFAULT_SAMPLE_RATE
    if rate not in fmt.sample_rates:
        raise InvalidRequest(
            f"sample_rate {rate} is not available for {fmt.name}; use one of "
            f"{', '.join(map(str, fmt.sample_rates))}",
            "sample_rate",
        )
    return fmt, rate


def _headers(request_id: str, fmt: AudioFormat, rate: int) -> dict[str, str]:
    headers = {
        "X-Request-Id": request_id,
        "X-Sample-Rate": str(rate),
        "X-Channels": "1",
        "Cache-Control": "no-cache",
    }
    if fmt.name in ("pcm", "wav"):
        headers["X-Bit-Depth"] = "16"
    return headers


async def _encoded(
    stream: SpeechStream, first: Audio, pipeline: AudioPipeline
) -> AsyncIterator[bytes]:
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


async def _audio_body(encoded: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for data in encoded:
            yield data
    except Exception as err:  # the stream has recorded it; cut the response
        raise StreamAborted(as_gateway_error(err).message) from err


async def _sse_events(
    encoded: AsyncIterator[bytes], pipeline: AudioPipeline, input_chars: int, hop: int
) -> AsyncIterator[dict[str, str]]:
    try:
        async for data in encoded:
            delta = SpeechAudioDelta(audio=base64.b64encode(data).decode("ascii"))
            yield {"data": delta.model_dump_json()}
    except Exception as err:  # after the first event: an error event, and no done
        yield sse_error_event(err)
        return
    tokens = pipeline.samples_in // hop
    usage = SpeechUsage(
        input_tokens=input_chars, output_tokens=tokens, total_tokens=input_chars + tokens
    )
    yield {"data": SpeechAudioDone(usage=usage).model_dump_json()}
