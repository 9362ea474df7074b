"""POST /v1/audio/speech/stream: streamed PCM16 over HTTP.

Errors found before the first audio are ordinary HTTP errors (4xx / 5xx, OpenAI's
error shape). After the first byte the status is sent, so a failure aborts the
response: the chunked body ends without its terminator, and the client sees an
incomplete transfer rather than a short, clean file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from decoder_gateway.api.protocol import PCM_HEADERS, VOICE_GLOBAL_TOKENS_HEADER
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.stream_protocol import SpeechStreamRequest
from decoder_gateway.api.streaming import SpeechResponse, start_stream
from decoder_gateway.audio.pcm import to_pcm16
from decoder_gateway.errors import GatewayError, StreamAborted
from decoder_gateway.serving import Audio, SpeechStream

router = APIRouter()


async def pcm_body(stream: SpeechStream, first: Audio) -> AsyncIterator[bytes]:
    try:
        yield to_pcm16(first.samples)
        async for audio in stream.audio():
            yield to_pcm16(audio.samples)
    except GatewayError as err:  # the stream has recorded it; cut the response
        raise StreamAborted(err.message) from err


@router.post(
    "/v1/audio/speech/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"audio/pcm": {}}, "description": "PCM16 LE, 16 kHz, mono"}},
)
async def speech_stream(body: SpeechStreamRequest, request: Request) -> SpeechResponse:
    gateway = get_gateway(request)
    service = gateway.speech
    job = await service.prepare(
        body.text,
        body.voice,
        body.speaker_id,
        body.temperature,
        body.max_tokens,
        request_id=request.headers.get("x-request-id"),
        ref_audio=body.ref_audio,
        style=body.style.to_style() if body.style else None,
    )
    stream, first = await start_stream(service, job, "stream", request)
    headers = {**PCM_HEADERS, "X-Request-Id": job.request_id}
    if (tokens := stream.designed_tokens) is not None:  # a style request's voice
        headers[VOICE_GLOBAL_TOKENS_HEADER] = ",".join(map(str, tokens))
    response = StreamingResponse(pcm_body(stream, first), media_type="audio/pcm", headers=headers)
    return SpeechResponse(response, stream, gateway.settings.slow_client_timeout_s)
