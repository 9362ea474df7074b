"""GET /, /v1/voices, /health."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from decoder_gateway.api.protocol import PCM_HEADERS
from decoder_gateway.api.state import get_gateway
from decoder_gateway.api.voices_protocol import VoiceInfo, VoiceList
from decoder_gateway.errors import GatewayError

router = APIRouter()


@router.get("/v1/voices")
async def list_voices(request: Request) -> VoiceList:
    service = get_gateway(request).voices
    voices = [*service.catalog, *await service.cloned()]  # packaged first
    return VoiceList(voices=[VoiceInfo.of(voice) for voice in voices])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 when the decode worker runs and vLLM answers; 503 with the reason otherwise."""
    gateway = get_gateway(request)  # set before the port opens: the decoder is loaded
    reason = gateway.worker.problem() or await gateway.llm.health()
    if reason is None and not gateway.llm.token_map_checked:
        try:
            await gateway.llm.check_token_map()
        except GatewayError as err:
            reason = err.message
    if reason is not None:
        return JSONResponse({"status": "unavailable", "reason": reason}, 503)
    decoder = gateway.decoder
    graphs = decoder.graphs
    slots = gateway.speech.slots
    estimate = slots.capacity.estimate()
    return JSONResponse(
        {
            "status": "ok",
            # What admission goes by: null where nothing has been measured yet.
            "capacity": {
                "streams": _rounded(estimate.streams),
                "llm_tokens_per_s": _rounded(estimate.llm_tokens_per_s),
                "llm_saturated": estimate.llm_saturated,
                "decoder_tokens_per_s": _rounded(estimate.decoder_tokens_per_s),
                "decoder_busy": round(estimate.decoder_busy, 2),
                "lower_bound": estimate.lower_bound,
                "active_streams": slots.active,
                "queued": slots.queued,
            },
            "decoder_device": str(decoder.device),
            "decoder_dtype": str(decoder.dtype).removeprefix("torch."),
            "decoder_batch_tokens": decoder.batch_tokens,
            # False also when a capture failed (the decoder then runs eagerly).
            "decoder_cuda_graphs": graphs is not None and graphs.failure is None,
            "model": gateway.llm.model,
            "cloning": gateway.voices.cloning,
        }
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@router.get("/livez")
async def liveness(request: Request) -> JSONResponse:
    """200 while this process can serve (its decode worker runs), whatever vLLM does:
    for a liveness probe, which must not restart the gateway when vLLM is away."""
    problem = get_gateway(request).worker.problem()
    if problem is not None:
        return JSONResponse({"status": "dead", "reason": problem}, 503)
    return JSONResponse({"status": "alive"})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    registry = get_gateway(request).metrics
    return Response(registry.render(), media_type=registry.content_type)


@router.get("/")
async def server_info(request: Request) -> dict:
    gateway = get_gateway(request)
    base = str(request.base_url).rstrip("/")
    ws_base = base.replace("http", "ws", 1)
    voice = gateway.voices.catalog.default_voice
    return {
        "name": "Spark-TTS decoder gateway",
        "model": gateway.llm.model,
        "voices": [v.id for v in gateway.voices.catalog],
        "cloning": gateway.voices.cloning,
        "default_voice": voice,
        "audio_format": {
            "encoding": "pcm_s16le",
            "sample_rate": int(PCM_HEADERS["X-Sample-Rate"]),
            "bit_depth": 16,
            "channels": 1,
        },
        "endpoints": {
            "POST /v1/audio/speech/stream": "JSON {text, voice, speaker_id, temperature, "
            "max_tokens} -> streamed audio/pcm",
            "WS /v1/audio/speech/stream/ws": "JSON {input, voice, speaker_id, temperature, "
            "segment_id, continue} -> start, binary PCM frames, end; "
            "{type: cancel, segment_id} -> cancelled",
            "GET /v1/voices": "the voices (packaged and cloned)",
            "POST /v1/audio/voices": "multipart {audio_sample, name, ...} -> a cloned voice",
            "GET /v1/audio/voices/{name}": "one cloned voice; DELETE removes it",
            "GET /health": "200 when the decode worker runs and vLLM answers",
            "GET /livez": "200 while the gateway itself works (not vLLM)",
        },
        "examples": {
            "curl": f"curl -sN {base}/v1/audio/speech/stream -H 'Content-Type: application/json' "
            f'-d \'{{"text": "Oli otya?", "voice": "{voice}"}}\' '
            "| ffmpeg -f s16le -ar 16000 -ac 1 -i - out.wav",
            "websocket": f"{ws_base}/v1/audio/speech/stream/ws: send "
            f'{{"input": "Oli otya?", "voice": "{voice}", "segment_id": 1}}',
        },
    }
