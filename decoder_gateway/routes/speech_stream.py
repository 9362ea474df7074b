"""POST /v1/audio/speech/stream: streamed PCM16 over HTTP.

Errors found before the first audio are ordinary HTTP errors (4xx / 503 / 502).
After the first byte the status is sent, so a failure aborts the response: the
chunked body ends without its terminator, and the client sees an incomplete
transfer rather than a short, clean file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..audio import to_pcm16
from ..errors import GatewayError, StreamAborted
from ..protocol import PCM_HEADERS, SpeechStreamRequest
from .streaming import first_audio

router = APIRouter()


@router.post(
    "/v1/audio/speech/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"audio/pcm": {}}, "description": "PCM16 LE, 16 kHz, mono"}},
)
async def speech_stream(body: SpeechStreamRequest, request: Request) -> StreamingResponse:
    synthesizer = request.app.state.gateway.synthesizer
    job = synthesizer.prepare(
        body.text,
        body.voice,
        body.speaker_id,
        body.temperature,
        body.max_tokens,
        request_id=request.headers.get("x-request-id"),
    )
    audio = synthesizer.stream(job, endpoint="stream")
    first = await first_audio(request, audio)

    async def pcm() -> AsyncIterator[bytes]:
        try:
            yield to_pcm16(first)
            async for chunk in audio:
                yield to_pcm16(chunk)
        except GatewayError as err:  # the synthesizer logged it; cut the response
            raise StreamAborted(err.message) from err
        finally:
            await audio.aclose()

    headers = {**PCM_HEADERS, "X-Request-Id": job.request_id}
    return StreamingResponse(pcm(), media_type="audio/pcm", headers=headers)
